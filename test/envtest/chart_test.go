package envtest

// The Helm chart as a release artefact: what changes between two chart
// versions, what it asks of the cluster (kubeVersion), and its CRDs.

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"sigs.k8s.io/controller-runtime/pkg/client"
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

// TestHelmUpgradeChangesCRD is the chart's upgrade path for the CRD. Chart
// 0.1.0 shipped it in crds/, which Helm installs once, never upgrades and
// does not own; the chart now renders it from templates/crds. The test
// installs a copy of the chart in the 0.1.0 layout on a cluster that already
// has the CRD (as every 0.1.0 install does), then upgrades to a chart whose
// CRD template differs: the first upgrade needs --take-ownership (or the
// kubectl commands of docs/install.md) and changes the CRD; a later upgrade
// changes it again without help; an uninstall keeps it.
func TestHelmUpgradeChangesCRD(t *testing.T) {
	const ns, release = "tandem-crd-upgrade", "tandem-crd"
	const crdName = "volumepairs.storage.tandem.dev"
	const crdFile = "storage.tandem.dev_volumepairs.yaml"
	ctx := context.Background()
	ensureNamespace(t, ns)

	// 0.1.0: the CRD in crds/, no templates/crds.
	old := copyChart(t, func(c map[string]any) { c["version"] = "0.1.0" })
	if err := os.RemoveAll(filepath.Join(old, "templates", "crds")); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(repoRoot, "config", "crd", "bases", crdFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(old, "crds"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(old, "crds", crdFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	// The next version: its CRD gains a category.
	next := copyChart(t, func(c map[string]any) { c["version"] = "0.2.0" })
	tpl := filepath.Join(next, "templates", "crds", crdFile)
	if b, err = os.ReadFile(tpl); err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(b), "    categories:\n    - tandem\n", "    categories:\n    - tandem\n    - tandem-next\n", 1)
	if changed == string(b) {
		t.Fatalf("%s has no categories list to change", tpl)
	}
	if err := os.WriteFile(tpl, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}

	installed := true
	if _, err := helm(t, "install", release, old, "--namespace", ns); err != nil {
		t.Fatalf("helm install (0.1.0 layout): %v", err)
	}
	t.Cleanup(func() {
		if installed {
			if _, err := helm(t, "uninstall", release, "--namespace", ns); err != nil {
				t.Errorf("helm uninstall: %v", err)
			}
		}
		// Leave the CRD as the suite made it: the spec of config/crd/bases
		// (the last upgrade restored it), without Helm's ownership.
		crd := newCRD()
		if err := k8s.Get(ctx, client.ObjectKey{Name: crdName}, crd); err != nil {
			t.Errorf("the CRD is gone: %v", err)
			return
		}
		a := crd.GetAnnotations()
		for _, k := range []string{"meta.helm.sh/release-name", "meta.helm.sh/release-namespace", "helm.sh/resource-policy"} {
			delete(a, k)
		}
		crd.SetAnnotations(a)
		crd.SetLabels(nil)
		if err := k8s.Update(ctx, crd); err != nil {
			t.Errorf("drop Helm's ownership of the CRD: %v", err)
		}
	})
	getCRD := func() *unstructured.Unstructured {
		t.Helper()
		crd := newCRD()
		if err := k8s.Get(ctx, client.ObjectKey{Name: crdName}, crd); err != nil {
			t.Fatalf("get CRD: %v", err)
		}
		return crd
	}
	categories := func(crd *unstructured.Unstructured) []string {
		c, _, _ := unstructured.NestedStringSlice(crd.Object, "spec", "names", "categories")
		return c
	}
	if slices.Contains(categories(getCRD()), "tandem-next") {
		t.Fatal("the CRD has category tandem-next before the upgrade")
	}

	// Helm refuses to adopt the CRD it did not create...
	if _, err := helm(t, "upgrade", release, next, "--namespace", ns); err == nil || !strings.Contains(err.Error(), "invalid ownership metadata") {
		t.Errorf("helm upgrade from the crds/ layout without --take-ownership = %v, want a refusal for invalid ownership metadata (docs/install.md explains it)", err)
	}
	// ...until told to.
	if _, err := helm(t, "upgrade", release, next, "--namespace", ns, "--take-ownership"); err != nil {
		t.Fatalf("helm upgrade --take-ownership: %v", err)
	}
	crd := getCRD()
	if c := categories(crd); !slices.Contains(c, "tandem-next") {
		t.Errorf("after helm upgrade the CRD's categories = %v, want tandem-next among them", c)
	}
	if a := crd.GetAnnotations(); a["meta.helm.sh/release-name"] != release || a["helm.sh/resource-policy"] != "keep" {
		t.Errorf("after helm upgrade the CRD's annotations = %v, want it owned by release %s and kept on uninstall", a, release)
	}

	// Later upgrades change it like any other object.
	if _, err := helm(t, "upgrade", release, filepath.Join(repoRoot, "charts", "tandem"), "--namespace", ns); err != nil {
		t.Fatalf("helm upgrade to the repository's chart: %v", err)
	}
	if c := categories(getCRD()); slices.Contains(c, "tandem-next") {
		t.Errorf("after the second helm upgrade the CRD's categories = %v, want tandem-next gone", c)
	}

	if _, err := helm(t, "uninstall", release, "--namespace", ns); err != nil {
		t.Fatalf("helm uninstall: %v", err)
	}
	installed = false
	if crd := getCRD(); crd.GetDeletionTimestamp() != nil {
		t.Error("helm uninstall is deleting the CRD (and with it every VolumePair); want it kept")
	}
}

// newCRD is an empty CustomResourceDefinition for the client to fill (the
// suite's scheme does not know the apiextensions types).
func newCRD() *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion("apiextensions.k8s.io/v1")
	u.SetKind("CustomResourceDefinition")
	return u
}

// TestHelmValuesSchema keeps charts/tandem/values.schema.json and values.yaml
// in step (every key of values.yaml is in the schema, and the schema
// describes no key values.yaml lacks, except inside free-form maps), and
// checks that helm refuses bad values with a message naming the field.
func TestHelmValuesSchema(t *testing.T) {
	chart := filepath.Join(repoRoot, "charts", "tandem")
	read := func(name string) map[string]any {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(chart, name))
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return m
	}
	values, schema := read("values.yaml"), read("values.schema.json")
	var walk func(path string, v, s map[string]any)
	walk = func(path string, v, s map[string]any) {
		props, _ := s["properties"].(map[string]any)
		if props == nil {
			// A free-form map (labels, resources, ...): its keys are the
			// user's.
			if s["additionalProperties"] == false {
				t.Errorf("schema %s: an object without properties that allows none", path)
			}
			return
		}
		// additionalProperties with a schema of its own: a map with some
		// keys checked (StorageClass parameters).
		_, openMap := s["additionalProperties"].(map[string]any)
		for k, x := range v {
			p := path + "." + k
			ps, ok := props[k].(map[string]any)
			if !ok && openMap {
				continue
			}
			if !ok {
				t.Errorf("values.yaml has %s, values.schema.json does not describe it", p)
				continue
			}
			if vm, ok := x.(map[string]any); ok {
				walk(p, vm, ps)
			}
		}
		for k := range props {
			if _, ok := v[k]; !ok && s["additionalProperties"] == false {
				t.Errorf("values.schema.json describes %s.%s, values.yaml has no such key", path, k)
			}
		}
		if s["additionalProperties"] != false && !openMap {
			t.Errorf("schema %s: lists properties but allows others (a typo would pass)", path)
		}
	}
	walk("", values, schema)

	if _, err := helm(t, "lint", "--strict", chart); err != nil {
		t.Errorf("helm lint --strict with the defaults: %v", err)
	}
	for _, c := range []struct{ set, want string }{
		{"csi.attach=bogus", "/csi/attach"},
		{"agent.ports.nbd=0", "/agent/ports/nbd"},
		{"agent.ports.control=70000", "/agent/ports/control"},
		{"manager.replicas=two", "/manager/replicas"},
		{"manager.leaderElection.leaseDuration=8", "/manager/leaderElection/leaseDuration"},
		{"image.pullPolicy=Sometimes", "/image/pullPolicy"},
		{"agent.dataDir=relative/dir", "/agent/dataDir"},
		{"agent.maxInflightBytes=lots", "/agent/maxInflightBytes"},
		{"csi.storageClass.parameters.mode=sync", "/csi/storageClass/parameters/mode"},
		{"crds.install=maybe", "/crds/install"},
		{"agent.tokenSecret.existingSecretKey=", "/agent/tokenSecret/existingSecretKey"},
		{"agent.tokn=x", "'tokn'"},
	} {
		if _, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace, "--set", c.set); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("helm template --set %s = %v, want a schema error naming %s", c.set, err, c.want)
		}
		if _, err := helm(t, "lint", "--strict", chart, "--set", c.set); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("helm lint --strict --set %s = %v, want a schema error naming %s", c.set, err, c.want)
		}
	}
}

// TestHelmRenderIsStableWithExistingSecret: what a GitOps tool does (render
// the chart without the cluster, twice) gives the same manifest when the
// token comes from agent.tokenSecret.existingSecret, with no Secret in it;
// without it the generated token differs per render, which is why the docs
// and NOTES tell GitOps users to set it.
func TestHelmRenderIsStableWithExistingSecret(t *testing.T) {
	chart := filepath.Join(repoRoot, "charts", "tandem")
	render := func(args ...string) string {
		t.Helper()
		out, err := helm(t, append([]string{"template", "tandem", chart, "--namespace", operatorNamespace}, args...)...)
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		return out
	}
	set := []string{"--set", "agent.tokenSecret.existingSecret=my-token,agent.tokenSecret.existingSecretKey=shared"}
	a, b := render(set...), render(set...)
	if a != b {
		t.Error("two renders with agent.tokenSecret.existingSecret differ: a GitOps tool would change something on every sync")
	}
	objs := decodeManifest(t, a)
	for _, o := range objs {
		if o.GetKind() == "Secret" {
			t.Errorf("with existingSecret the chart renders Secret %s", o.GetName())
		}
	}
	ds := findObject(objs, "DaemonSet", operatorNamespace, "tandem-agent")
	if ds == nil || !strings.Contains(mustYAML(t, ds.Object), "secretName: my-token") {
		t.Error("the agent DaemonSet does not mount Secret my-token")
	}
	if first, second := render(), render(); first == second {
		t.Error("two renders without existingSecret are identical: the generated token is not random (or this test no longer shows the GitOps hazard)")
	}
}

func mustYAML(t *testing.T, v any) string {
	t.Helper()
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHelmTestPod: `helm test` runs a Pod with the chart's own image that
// calls the manager binary's chart-test (cmd/manager, TestChartTest) with the
// release's namespace, name and ports, under a service account that may list
// exactly what the check reads; the API server accepts all of it.
func TestHelmTestPod(t *testing.T) {
	const ns = "tandem-helm-test"
	ensureNamespace(t, ns)
	out, err := helm(t, "template", "tandem", filepath.Join(repoRoot, "charts", "tandem"), "--namespace", ns,
		"--show-only", "templates/tests/health.yaml", "--set", "manager.probePort=9081,agent.ports.control=9400")
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	objs := decodeManifest(t, out)
	for _, o := range objs {
		if o.GetAnnotations()["helm.sh/hook"] != "test" {
			t.Errorf("%s %s is not a test hook: helm install would create it", o.GetKind(), o.GetName())
		}
	}
	p := findObject(objs, "Pod", ns, "tandem-test")
	if p == nil {
		t.Fatal("no test Pod tandem-test")
	}
	pod := typed[corev1.Pod](t, p)
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("test Pod has %d containers, want 1", len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	if want := "ghcr.io/tandem-storage/tandem:" + chartAppVersion(t); c.Image != want {
		t.Errorf("test Pod image = %s, want the chart's image %s", c.Image, want)
	}
	wantCmd := []string{"/usr/local/bin/manager", "chart-test", "--namespace=" + ns, "--instance=tandem", "--manager-probe-port=9081", "--agent-control-port=9400"}
	if !slices.Equal(c.Command, wantCmd) {
		t.Errorf("test Pod command = %v, want %v", c.Command, wantCmd)
	}
	if pod.Spec.RestartPolicy != corev1.RestartPolicyNever || pod.Spec.ServiceAccountName != "tandem-test" {
		t.Errorf("test Pod restartPolicy %q, serviceAccount %q; want Never, tandem-test", pod.Spec.RestartPolicy, pod.Spec.ServiceAccountName)
	}
	for _, want := range []objKey{
		{"ServiceAccount", ns, "tandem-test"}, {"Role", ns, "tandem-test"}, {"RoleBinding", ns, "tandem-test"},
		{"ClusterRole", "", "tandem-test"}, {"ClusterRoleBinding", "", "tandem-test"},
	} {
		if findObject(objs, want.kind, want.namespace, want.name) == nil {
			t.Errorf("the test renders no %s %s/%s", want.kind, want.namespace, want.name)
		}
	}
	dryRunApply(t, out, len(objs))
}
