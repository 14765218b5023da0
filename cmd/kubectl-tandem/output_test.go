package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/yaml"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

type pluginResult struct {
	stdout, stderr string
	err            error
	// connected: the command asked for an API client.
	connected bool
	// c is the fake API server, as the command left it.
	c client.Client
}

// runPluginFake runs the plugin's subcommands in-process against a fake API
// server holding objs, in namespace prod.
func runPluginFake(t *testing.T, objs []client.Object, args ...string) pluginResult {
	t.Helper()
	return runPluginArgs(t, objs, func(kubeconfig string) []string {
		return append([]string{"--kubeconfig", kubeconfig, "-n", "prod"}, args...)
	})
}

// runPluginArgs runs the plugin with the arguments args returns, given the
// path of an empty kubeconfig, against a fake API server holding objs.
func runPluginArgs(t *testing.T, objs []client.Object, args func(kubeconfig string) []string) pluginResult {
	t.Helper()
	return runPluginWith(t, objs, interceptor.Funcs{Get: withManagedFields}, args)
}

// runPluginWith is runPluginArgs with the fake API server's calls going
// through funcs. The namespaces of objs exist, and prod.
func runPluginWith(t *testing.T, objs []client.Object, funcs interceptor.Funcs, args func(kubeconfig string) []string) pluginResult {
	t.Helper()
	seen := map[string]bool{}
	for _, o := range objs {
		if n, ok := o.(*corev1.Namespace); ok {
			seen[n.Name] = true
		}
	}
	for _, ns := range append([]string{"prod"}, namespacesOf(objs)...) {
		if !seen[ns] {
			seen[ns] = true
			objs = append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
		}
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := storagev1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(objs...).
		WithIndex(&corev1.Event{}, "involvedObject.kind", func(o client.Object) []string { return []string{o.(*corev1.Event).InvolvedObject.Kind} }).
		WithIndex(&corev1.Event{}, "involvedObject.name", func(o client.Object) []string { return []string{o.(*corev1.Event).InvolvedObject.Name} }).
		WithInterceptorFuncs(funcs).
		Build()
	// An empty kubeconfig: nothing from the environment or ~/.kube is read.
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte("apiVersion: v1\nkind: Config\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	var res pluginResult
	o := &rootOptions{
		flags:   genericclioptions.NewConfigFlags(true),
		streams: genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errb},
		// Commands that wait for the controller read often: the fake
		// answers at once.
		pollInterval: 10 * time.Millisecond,
		newClient: func() (client.Client, error) {
			res.connected = true
			return c, nil
		},
	}
	root := o.rootCmd()
	root.SetArgs(args(kubeconfig))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res.err = root.ExecuteContext(ctx)
	res.stdout, res.stderr, res.c = out.String(), errb.String(), c
	return res
}

// namespacesOf lists the namespaces of the namespaced objects in objs.
func namespacesOf(objs []client.Object) []string {
	var out []string
	for _, o := range objs {
		if _, ok := o.(*corev1.Namespace); !ok && o.GetNamespace() != "" {
			out = append(out, o.GetNamespace())
		}
	}
	return out
}

// withManagedFields makes the fake API server return VolumePairs with
// managed fields, as a real one does (the fake keeps none).
func withManagedFields(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	if err := c.Get(ctx, key, obj, opts...); err != nil {
		return err
	}
	if _, ok := obj.(*storagev1alpha1.VolumePair); ok {
		obj.SetManagedFields([]metav1.ManagedFieldsEntry{{
			Manager: "tandem-controller", Operation: metav1.ManagedFieldsOperationUpdate,
			APIVersion: storagev1alpha1.GroupVersion.String(), FieldsType: "FieldsV1", FieldsV1: metav1.NewFieldsV1(`{"f:status":{}}`),
		}})
	}
	return nil
}

func TestStatusOutputFormats(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // the exact output
	}{
		{"jsonpath", []string{"-o", "jsonpath={.status.phase} {.status.activePrimary} {.status.epoch}"}, "COPY node-b 4"},
		{"jsonpath range", []string{"-o", `jsonpath={range .status.members[*]}{.node}={.dataState}{"\n"}{end}`}, "node-b=UpToDate\nnode-a=Inconsistent\n"},
		{"jsonpath keeps integers", []string{"-o", "jsonpath={.status.outOfSyncBytes} {.status.copy.totalBytes}"}, "12582912 12582912"},
		{"jsonpath apiVersion and kind", []string{"-o", "jsonpath={.apiVersion}/{.kind}"}, "storage.tandem.dev/v1alpha1/VolumePair"},
		{"go-template", []string{"-o", `go-template={{.metadata.name}} {{.status.phase}}{{range .status.conditions}} {{.type}}={{.status}}{{end}}`}, "db COPY Ready=True Synchronized=False"},
		{"go-template with --template", []string{"-o", "go-template", "--template", "{{.spec.mode}}"}, "Async"},
		{"--template alone means go-template", []string{"--template", "{{.status.endpoint}}"}, "nbd://198.18.0.12:10809/prod/db"},
		{"name", []string{"-o", "name"}, "volumepair.storage.tandem.dev/db\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := runPluginFake(t, []client.Object{copyingPair()}, append([]string{"status", "db"}, tt.args...)...)
			if res.err != nil {
				t.Fatalf("status %v: %v\n%s", tt.args, res.err, res.stderr)
			}
			if res.stdout != tt.want {
				t.Errorf("status %v printed %q, want %q", tt.args, res.stdout, tt.want)
			}
		})
	}
}

func TestStatusOutputJSONAndYAML(t *testing.T) {
	res := runPluginFake(t, []client.Object{copyingPair()}, "status", "db", "-o", "json")
	var got storagev1alpha1.VolumePair
	if res.err != nil || json.Unmarshal([]byte(res.stdout), &got) != nil {
		t.Fatalf("status -o json: %v\n%s", res.err, res.stdout)
	}
	if got.Kind != "VolumePair" || got.APIVersion != storagev1alpha1.GroupVersion.String() || got.Name != "db" ||
		got.Status.Phase != storagev1alpha1.PhaseCopy || len(got.ManagedFields) != 0 {
		t.Errorf("status -o json printed %s %s %s phase %s with %d managed fields", got.APIVersion, got.Kind, got.Name, got.Status.Phase, len(got.ManagedFields))
	}
	if !strings.HasPrefix(res.stdout, "{\n    \"kind\": \"VolumePair\",\n") {
		t.Errorf("status -o json is not indented like kubectl's:\n%s", res.stdout)
	}

	res = runPluginFake(t, []client.Object{copyingPair()}, "status", "db", "-o", "json", "--show-managed-fields")
	got = storagev1alpha1.VolumePair{}
	if res.err != nil || json.Unmarshal([]byte(res.stdout), &got) != nil || len(got.ManagedFields) != 1 {
		t.Errorf("status -o json --show-managed-fields: %v, %d managed fields\n%s", res.err, len(got.ManagedFields), res.stdout)
	}

	res = runPluginFake(t, []client.Object{copyingPair()}, "status", "db", "-o", "yaml")
	got = storagev1alpha1.VolumePair{}
	if res.err != nil || yaml.Unmarshal([]byte(res.stdout), &got) != nil {
		t.Fatalf("status -o yaml: %v\n%s", res.err, res.stdout)
	}
	if !strings.Contains(res.stdout, "kind: VolumePair\n") || !strings.Contains(res.stdout, "phase: COPY\n") || strings.Contains(res.stdout, "managedFields") || got.Status.Epoch != 4 {
		t.Errorf("status -o yaml:\n%s", res.stdout)
	}
}

// TestStatusHumanOutput: without -o the summary is printed, as before -o
// went through cli-runtime.
func TestStatusHumanOutput(t *testing.T) {
	res := runPluginFake(t, []client.Object{copyingPair()}, "status", "db")
	if res.err != nil {
		t.Fatal(res.err)
	}
	for _, want := range []string{"Name:             db\n", "Phase:            COPY (a copy towards a member is running)\n", "Members:\n", "Events:\n"} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status output lacks %q:\n%s", want, res.stdout)
		}
	}
}

// TestOutputFormatErrors: an unknown format or a broken template fails before
// the API server is contacted (a request is not sent and then reported
// unprintable), naming the formats there are.
func TestOutputFormatErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"status", "db", "-o", "wide"}, `unknown output format "wide": want one of json, yaml, kyaml, name, go-template,`},
		{[]string{"status", "db", "-o", "jsonpath={.status.phase"}, `output format "jsonpath={.status.phase"`},
		{[]string{"status", "db", "-o", "go-template={{.status.phase"}, `output format "go-template={{.status.phase"`},
		{[]string{"failover", "db", "-o", "wide"}, `unknown output format "wide"`},
		{[]string{"verify", "db", "-o", "name"}, `unknown output format "name": want one of json, yaml, go-template,`},
		{[]string{"verify", "db", "-o", "kyaml"}, `unknown output format "kyaml"`},
	}
	for _, tt := range tests {
		res := runPluginFake(t, []client.Object{copyingPair()}, tt.args...)
		if res.err == nil || !strings.Contains(res.err.Error(), tt.want) {
			t.Errorf("%v: error %v, want one containing %q", tt.args, res.err, tt.want)
		}
		if res.connected {
			t.Errorf("%v: the API server was contacted before -o was checked", tt.args)
		}
		if tt.args[0] == "verify" {
			var ee *exitError
			if !errors.As(res.err, &ee) || ee.code != 2 {
				t.Errorf("%v: %v, want exit status 2 (the check could not be run)", tt.args, res.err)
			}
		}
	}
}

func TestRequestOutput(t *testing.T) {
	res := runPluginFake(t, []client.Object{writerLostPair()}, "failover", "db", "-o", "jsonpath={.metadata.annotations.storage\\.tandem\\.dev/failover-requested}")
	if res.err != nil {
		t.Fatal(res.err)
	}
	if _, err := time.Parse(time.RFC3339, res.stdout); err != nil {
		t.Errorf("failover -o jsonpath printed %q, want the request's RFC 3339 time: %v", res.stdout, err)
	}
	res = runPluginFake(t, []client.Object{copyingPair()}, "failback", "db", "-o", "go-template={{index .metadata.annotations \"storage.tandem.dev/failback-requested\"}}")
	if res.err != nil {
		t.Fatal(res.err)
	}
	if _, err := time.Parse(time.RFC3339, res.stdout); err != nil || res.stdout == "2026-05-01T11:59:00Z" {
		t.Errorf("failback -o go-template printed %q, want the new request's RFC 3339 time (%v)", res.stdout, err)
	}
}

// TestReportOutput: verify's report has no apiVersion and kind; -o json and
// yaml print it as it is, the templates see the same JSON.
func TestReportOutput(t *testing.T) {
	rep := &verifyReport{
		Volume: "prod/db", Nodes: []string{"node-a", "node-b"}, SizeBytes: 1 << 30, RegionSize: 64 << 10, Regions: 16384,
		Algorithm: "sha256", Seconds: 3.5, DifferingRegions: 3, DifferingBytes: 3 * 64 << 10,
		Runs: mergeRuns([]uint32{5, 6, 100}, 64<<10), DirtyRegions: 1,
	}
	wantJSON, err := json.MarshalIndent(rep, "", "    ")
	if err != nil {
		t.Fatal(err)
	}
	wantYAML, err := yaml.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-o", "json"}, string(wantJSON) + "\n"},
		{[]string{"-o", "yaml"}, string(wantYAML)},
		{[]string{"-o", "jsonpath={.differingRegions} {.runs[*].firstRegion}"}, "3 5 100"},
		{[]string{"-o", `jsonpath={range .runs[*]}{.offset}+{.length}{"\n"}{end}`}, "327680+131072\n6553600+65536\n"},
		{[]string{"-o", "go-template={{.volume}} {{len .runs}} {{range .nodes}}{{.}} {{end}}"}, "prod/db 2 node-a node-b "},
		{[]string{"--template", "{{.algorithm}}"}, "sha256"},
	}
	for _, tt := range tests {
		cmd := &cobra.Command{Use: "verify"}
		out := addReportOutput(cmd, "the report")
		if err := cmd.ParseFlags(tt.args); err != nil {
			t.Fatal(err)
		}
		if out.human() {
			t.Fatalf("%v: human output", tt.args)
		}
		p, err := out.printer()
		if err != nil {
			t.Fatalf("%v: %v", tt.args, err)
		}
		var buf bytes.Buffer
		if err := out.printReport(p, &buf, rep); err != nil {
			t.Fatalf("%v: %v", tt.args, err)
		}
		if buf.String() != tt.want {
			t.Errorf("%v printed %q, want %q", tt.args, buf.String(), tt.want)
		}
	}
	cmd := &cobra.Command{Use: "verify"}
	if out := addReportOutput(cmd, "the report"); !out.human() {
		t.Error("no -o: not human output")
	}
}
