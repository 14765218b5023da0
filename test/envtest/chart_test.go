package envtest

// The Helm chart as a release artefact: what changes between two chart
// versions, what it asks of the cluster (kubeVersion), and its CRDs.

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"sigs.k8s.io/yaml"
)

var (
	serverVersionOnce sync.Once
	serverVersionStr  string
	serverVersionErr  error
)

// serverVersion is the test API server's Kubernetes version (v1.37.2, say).
func serverVersion(t *testing.T) string {
	t.Helper()
	serverVersionOnce.Do(func() {
		dc, err := discovery.NewDiscoveryClientForConfig(cfg)
		if err != nil {
			serverVersionErr = err
			return
		}
		v, err := dc.ServerVersion()
		if err != nil {
			serverVersionErr = err
			return
		}
		serverVersionStr = v.GitVersion
	})
	if serverVersionErr != nil {
		t.Fatalf("the API server's version: %v", serverVersionErr)
	}
	return serverVersionStr
}

// copyChart copies charts/tandem into a temporary directory and applies
// edit (may be nil) to the copy's Chart.yaml, parsed as a map.
func copyChart(t *testing.T, edit func(chart map[string]any)) string {
	t.Helper()
	src := filepath.Join(repoRoot, "charts", "tandem")
	dst := filepath.Join(t.TempDir(), "tandem")
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatalf("copy the chart: %v", err)
	}
	if edit != nil {
		f := filepath.Join(dst, "Chart.yaml")
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var c map[string]any
		if err := yaml.Unmarshal(b, &c); err != nil {
			t.Fatal(err)
		}
		edit(c)
		if b, err = yaml.Marshal(c); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// TestHelmChartBumpKeepsPodTemplates renders the chart at two chart (and app)
// versions with the image pinned, and requires every Pod template to be
// identical: a label or annotation with the chart's version in a Pod template
// would roll every agent (and so interrupt every volume) on a chart bump
// that changes nothing they run. The objects' own labels do carry it.
func TestHelmChartBumpKeepsPodTemplates(t *testing.T) {
	templates := func(chart string) (map[string]any, map[string]string) {
		t.Helper()
		out, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace, "--set", "image.tag=pinned")
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		pods, versions := map[string]any{}, map[string]string{}
		for _, o := range decodeManifest(t, out) {
			if o.GetKind() != "DaemonSet" && o.GetKind() != "Deployment" {
				continue
			}
			tpl, ok, err := unstructured.NestedMap(o.Object, "spec", "template")
			if !ok || err != nil {
				t.Fatalf("%s %s has no Pod template: %v", o.GetKind(), o.GetName(), err)
			}
			key := o.GetKind() + "/" + o.GetName()
			pods[key] = tpl
			versions[key] = o.GetLabels()["helm.sh/chart"]
		}
		return pods, versions
	}
	oldPods, oldVersions := templates(copyChart(t, func(c map[string]any) { c["version"], c["appVersion"] = "0.1.0", "0.1.0" }))
	newPods, newVersions := templates(copyChart(t, func(c map[string]any) { c["version"], c["appVersion"] = "0.2.0", "0.2.0" }))
	for _, want := range []string{"DaemonSet/tandem-agent", "Deployment/tandem-manager", "DaemonSet/tandem-csi-node"} {
		if _, ok := newPods[want]; !ok {
			t.Errorf("the chart renders no %s", want)
		}
	}
	for key, tpl := range newPods {
		if !equality.Semantic.DeepEqual(oldPods[key], tpl) {
			a, _ := yaml.Marshal(oldPods[key])
			b, _ := yaml.Marshal(tpl)
			t.Errorf("%s: the Pod template changes with the chart version (every Pod would roll):\n--- 0.1.0\n%s--- 0.2.0\n%s", key, a, b)
		}
		// The objects keep the version label, and it did change: the
		// comparison above is not vacuous.
		if oldVersions[key] != "tandem-0.1.0" || newVersions[key] != "tandem-0.2.0" {
			t.Errorf("%s: helm.sh/chart = %q, %q, want tandem-0.1.0, tandem-0.2.0", key, oldVersions[key], newVersions[key])
		}
	}
}

// TestHelmKubeVersion: the chart refuses Kubernetes older than 1.29, whose
// API servers lack the CEL quantity library the CRD's rules call, and accepts
// 1.29 including vendor builds.
func TestHelmKubeVersion(t *testing.T) {
	chart := filepath.Join(repoRoot, "charts", "tandem")
	_, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace, "--kube-version", "1.28.9")
	if err == nil || !strings.Contains(err.Error(), ">=1.29.0-0") {
		t.Errorf("helm template --kube-version 1.28.9 = %v, want a refusal naming >=1.29.0-0", err)
	}
	for _, v := range []string{"1.29.0", "v1.30.2-eks-1234"} {
		if _, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace, "--kube-version", v); err != nil {
			t.Errorf("helm template --kube-version %s: %v", v, err)
		}
	}
}
