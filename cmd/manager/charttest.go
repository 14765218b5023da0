package main

// `manager chart-test` is what the Helm chart's test Pod runs (helm test):
// the image has no shell or curl, so the check lives in the binary the
// chart already ships. It passes when the VolumePair API is served, every
// running manager answers /healthz on its probe port and every running agent
// answers /healthz on its control port (the node's IP: agents use the host
// network), and at least one of each runs.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

type chartTestOptions struct {
	namespace, instance string
	managerPort         int
	agentPort           int
}

// chartTestMain runs the check with args (after "chart-test") and returns
// the exit status.
func chartTestMain(args []string) int {
	fs := flag.NewFlagSet("chart-test", flag.ContinueOnError)
	var o chartTestOptions
	fs.StringVar(&o.namespace, "namespace", os.Getenv("POD_NAMESPACE"), "Namespace of the release.")
	fs.StringVar(&o.instance, "instance", "", "The release's app.kubernetes.io/instance label.")
	fs.IntVar(&o.managerPort, "manager-probe-port", 8081, "The managers' health probe port.")
	fs.IntVar(&o.agentPort, "agent-control-port", 7400, "The agents' control port.")
	timeout := fs.Duration("timeout", 60*time.Second, "Give up after this long.")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.namespace == "" || o.instance == "" {
		fmt.Fprintln(os.Stderr, "chart-test: --namespace and --instance are required")
		return 2
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		fmt.Fprintln(os.Stderr, "chart-test:", err)
		return 1
	}
	c, err := client.New(cfg, client.Options{Scheme: newScheme()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "chart-test:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	hc := &http.Client{Timeout: 5 * time.Second}
	// Pods that just started may not answer yet: retry until the timeout.
	for {
		err = chartTest(ctx, c, o, hc, os.Stdout)
		if err == nil {
			fmt.Println("chart-test: passed")
			return 0
		}
		fmt.Fprintln(os.Stderr, "chart-test:", err)
		select {
		case <-ctx.Done():
			return 1
		case <-time.After(3 * time.Second):
		}
	}
}

// chartTest runs the checks once, reporting each success to out.
func chartTest(ctx context.Context, c client.Client, o chartTestOptions, hc *http.Client, out io.Writer) error {
	var pairs storagev1alpha1.VolumePairList
	if err := c.List(ctx, &pairs, client.Limit(1)); err != nil {
		return fmt.Errorf("the VolumePair API is not served: %w", err)
	}
	fmt.Fprintln(out, "ok: the VolumePair API is served")
	for _, comp := range []struct {
		component, path string
		port            int
	}{
		{"manager", "/healthz", o.managerPort},
		{"agent", "/healthz", o.agentPort},
	} {
		var pods corev1.PodList
		if err := c.List(ctx, &pods, client.InNamespace(o.namespace), client.MatchingLabels{
			"app.kubernetes.io/instance":  o.instance,
			"app.kubernetes.io/component": comp.component,
		}); err != nil {
			return fmt.Errorf("list the %s Pods: %w", comp.component, err)
		}
		n := 0
		var errs []error
		for _, p := range pods.Items {
			if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" || p.DeletionTimestamp != nil {
				continue
			}
			n++
			url := "http://" + net.JoinHostPort(p.Status.PodIP, strconv.Itoa(comp.port)) + comp.path
			if err := get(ctx, hc, url); err != nil {
				errs = append(errs, fmt.Errorf("%s %s: %w", comp.component, p.Name, err))
				continue
			}
			fmt.Fprintf(out, "ok: %s %s answers %s\n", comp.component, p.Name, url)
		}
		if n == 0 {
			errs = append(errs, fmt.Errorf("no %s Pod runs in namespace %s", comp.component, o.namespace))
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	return nil
}

func get(ctx context.Context, hc *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}
