// Command kubectl-tandem is the kubectl plugin for Tandem VolumePairs:
//
//	kubectl tandem list [-A] [-o wide]     the VolumePairs of a namespace, or of all
//	kubectl tandem status NAME             phase, roles, diff, copy progress, members, conditions, events
//	kubectl tandem failover NAME           ask the controller to promote the backup of a lost writer
//	kubectl tandem failback NAME           ask the controller to give the primary role back after a failover
//	kubectl tandem promote NAME NODE       what force-promoting NODE would lose; --force does it (disaster recovery)
//	kubectl tandem hold NAME NODE          keep a returning member out of resync, its data as it came back
//	kubectl tandem release NAME NODE       end the hold: the member is resynced
//	kubectl tandem verify NAME             compare both replicas region by region (online verify)
//	kubectl tandem version                 the plugin's version and the install's
//	kubectl tandem completion SHELL        shell completion script (bash, zsh, fish, powershell)
//
// Install it by putting the binary on PATH as kubectl-tandem:
//
//	go build -o bin/kubectl-tandem ./cmd/kubectl-tandem
//	PATH=$PWD/bin:$PATH kubectl tandem status my-pair
//
// It takes kubectl's connection flags (--kubeconfig, --context, -n, ...).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func main() {
	// controller-runtime's client logs through its own logger; the plugin
	// reports errors itself.
	ctrllog.SetLogger(logr.Discard())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr})
	stop()
	os.Exit(code)
}

// exitError carries a specific exit status. A nil err means the command has
// already printed everything it wanted to say.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// run executes the plugin with args and returns the process exit status.
func run(ctx context.Context, args []string, streams genericiooptions.IOStreams) int {
	root := newRootCmd(streams)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
		if ee.err == nil {
			return code
		}
	}
	fmt.Fprintf(streams.ErrOut, "error: %v\n", err)
	return code
}

// rootOptions are shared by every subcommand.
type rootOptions struct {
	flags   *genericclioptions.ConfigFlags
	streams genericiooptions.IOStreams
	// newClient builds the API client; tests may replace it.
	newClient func() (client.Client, error)
	// pollInterval is how often a command that waits for the controller
	// reads the VolumePair (0: defaultPollInterval); tests shorten it.
	pollInterval time.Duration
}

func newRootCmd(streams genericiooptions.IOStreams) *cobra.Command {
	o := &rootOptions{flags: genericclioptions.NewConfigFlags(true), streams: streams}
	o.newClient = o.defaultClient
	return o.rootCmd()
}

// rootCmd builds the command tree around o.
func (o *rootOptions) rootCmd() *cobra.Command {
	streams := o.streams
	cmd := &cobra.Command{
		Use:   "kubectl-tandem",
		Short: "Inspect and operate Tandem VolumePairs",
		Long: `kubectl tandem inspects and operates Tandem VolumePairs: block volumes kept
on two nodes, with automatic failover and a resync of only what changed.`,
		Annotations:   map[string]string{cobra.CommandDisplayNameAnnotation: "kubectl tandem"},
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.SetIn(streams.In)
	cmd.SetOut(streams.Out)
	cmd.SetErr(streams.ErrOut)
	o.flags.AddFlags(cmd.PersistentFlags())
	_ = cmd.RegisterFlagCompletionFunc("namespace", o.completeNamespaces)
	cmd.AddCommand(newStatusCmd(o), newRequestCmd(o, failoverRequest), newRequestCmd(o, failbackRequest), newVerifyCmd(o), newVersionCmd(o), newListCmd(o),
		newPromoteCmd(o), newHoldCmd(o, true), newHoldCmd(o, false))
	initCompletionCmd(cmd)
	for _, sub := range cmd.Commands() {
		if strings.HasSuffix(sub.Use, " NAME") {
			sub.ValidArgsFunction = o.completePairNames
		}
	}
	return cmd
}

func (o *rootOptions) defaultClient() (client.Client, error) {
	cfg, err := o.flags.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("build scheme: %w", err)
	}
	if err := storagev1alpha1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("build scheme: %w", err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("connect to the API server: %w", err)
	}
	return c, nil
}

// namespace is -n, or the kubeconfig context's namespace, or "default".
func (o *rootOptions) namespace() (string, error) {
	ns, _, err := o.flags.ToRawKubeConfigLoader().Namespace()
	if err != nil {
		return "", fmt.Errorf("read the kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) for the namespace: %w", err)
	}
	return ns, nil
}

// connect returns the namespace a command acts in (-n or the context's) and
// a client.
func (o *rootOptions) connect() (string, client.Client, error) {
	ns, err := o.namespace()
	if err != nil {
		return "", nil, err
	}
	c, err := o.newClient()
	if err != nil {
		return "", nil, err
	}
	return ns, c, nil
}

// pair connects and reads the VolumePair NAME in the command's namespace.
func (o *rootOptions) pair(ctx context.Context, name string) (client.Client, *storagev1alpha1.VolumePair, error) {
	ns, c, err := o.connect()
	if err != nil {
		return nil, nil, err
	}
	vp, err := getPair(ctx, c, ns, name)
	if err != nil {
		return nil, nil, err
	}
	return c, vp, nil
}

// getPair reads one VolumePair.
func getPair(ctx context.Context, c client.Client, ns, name string) (*storagev1alpha1.VolumePair, error) {
	vp := &storagev1alpha1.VolumePair{}
	err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, vp)
	switch {
	case err == nil:
		return vp, nil
	case apierrors.IsNotFound(err) && !isResourceNotServed(err):
		return nil, pairNotFound(ctx, c, ns, name, err)
	}
	return nil, explainAPIError(fmt.Sprintf("get volumepair %s/%s", ns, name), err)
}

// nameArg accepts exactly one argument, the VolumePair's name.
func nameArg(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("%s needs exactly one argument, the VolumePair's name (got %d); see '%s --help'", cmd.Name(), len(args), cmd.CommandPath())
	}
	return nil
}

var volumePairGVK = storagev1alpha1.GroupVersion.WithKind("VolumePair")
