package envtest

// The install artefacts: the kustomize tree under config/ and the
// Helm chart under charts/tandem must render, say what docs/install.md says
// (least-privilege RBAC, a non-root manager, an agent without privileged mode
// or capabilities), and be accepted by a real API server.

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/tandem-storage/tandem/internal/csi"
)

const (
	operatorNamespace = "tandem-system"
	tokenMountPath    = "/etc/tandem/token"
	tokenFile         = "/etc/tandem/token/token"
)

// TestKustomizeRendersAndDryRunApplies renders config/default, checks what it
// contains and has the API server accept every object (server-side dry run).
func TestKustomizeRendersAndDryRunApplies(t *testing.T) {
	out, err := runTool(t, nil, "kubectl", "kustomize", filepath.Join(repoRoot, "config", "default"))
	if err != nil {
		t.Fatalf("kubectl kustomize config/default: %v", err)
	}
	objs := decodeManifest(t, out)
	want := append(workloadObjects("tandem"),
		objKey{"Namespace", "", operatorNamespace},
		objKey{"CustomResourceDefinition", "", "volumepairs.storage.tandem.dev"},
	)
	requireObjects(t, objs, want)
	// The token must be created by the user: a Secret in the repository
	// would be a token everybody knows.
	for _, o := range objs {
		if o.GetKind() == "Secret" {
			t.Errorf("kustomize output holds Secret %s; the token must not be shipped", o.GetName())
		}
	}
	checkWorkloads(t, objs, workloadExpect{
		prefix:      "tandem",
		namespace:   operatorNamespace,
		image:       "ghcr.io/tandem-storage/tandem:dev",
		tokenSecret: "tandem-agent-token",
		tokenKey:    "token",
		tolerateAll: true,
	})
	checkCSI(t, objs, "tandem", operatorNamespace)
	checkWebhook(t, objs, "tandem", operatorNamespace)
	if ns := findObject(objs, "Namespace", "", operatorNamespace); ns != nil {
		if got := ns.GetLabels()["pod-security.kubernetes.io/enforce"]; got != "privileged" {
			t.Errorf("namespace label pod-security.kubernetes.io/enforce = %q, want privileged (hostNetwork and hostPath need it)", got)
		}
	}

	ensureNamespace(t, operatorNamespace)
	dryRunApply(t, out, len(objs))
}

// TestHelmRendersAndDryRunApplies lints the chart, renders it with its
// defaults and with non-default values, and has the API server accept both.
func TestHelmRendersAndDryRunApplies(t *testing.T) {
	chart := filepath.Join(repoRoot, "charts", "tandem")
	if _, err := helm(t, "lint", "--strict", chart); err != nil {
		t.Fatalf("helm lint: %v", err)
	}

	t.Run("defaults", func(t *testing.T) {
		out, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace, "--include-crds", "--skip-tests") // TestHelmTestPod checks the test hooks
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs := decodeManifest(t, out)
		want := append(workloadObjects("tandem"),
			objKey{"CustomResourceDefinition", "", "volumepairs.storage.tandem.dev"},
			objKey{"Secret", operatorNamespace, "tandem-agent-token"},
		)
		want = append(want, metricsAuthObjects("tandem")...)
		requireObjects(t, objs, want)
		checkWorkloads(t, objs, workloadExpect{
			prefix:      "tandem",
			namespace:   operatorNamespace,
			image:       "ghcr.io/tandem-storage/tandem:" + chartAppVersion(t),
			tokenSecret: "tandem-agent-token",
			tokenKey:    "token",
			tolerateAll: true,
		})
		if s := findObject(objs, "Secret", operatorNamespace, "tandem-agent-token"); s != nil {
			tok, _, _ := unstructured.NestedString(s.Object, "data", "token")
			raw, err := base64.StdEncoding.DecodeString(tok)
			if err != nil || len(raw) < 32 {
				t.Errorf("generated token = %q (%d bytes decoded, err %v), want at least 32 random bytes", tok, len(raw), err)
			}
		}
		checkCSI(t, objs, "tandem", operatorNamespace)
		checkWebhook(t, objs, "tandem", operatorNamespace)
		checkMetricsAuth(t, objs, "tandem", operatorNamespace, true)
		ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", operatorNamespace, "tandem-agent"))
		if ds != nil && len(ds.Spec.Template.Spec.NodeSelector) != 0 {
			t.Errorf("agent nodeSelector = %v, want none by default", ds.Spec.Template.Spec.NodeSelector)
		}
		ensureNamespace(t, operatorNamespace)
		dryRunApply(t, out, len(objs))
	})

	t.Run("non-default values in another namespace", func(t *testing.T) {
		const ns = "tandem-edge"
		values := filepath.Join(t.TempDir(), "values.yaml")
		if err := os.WriteFile(values, []byte(`
image:
  repository: registry.example.com/storage/tandem
  tag: v9.9.9
manager:
  replicas: 2
  leaderElect: true
  metricsPort: 9090
  metricsService:
    enabled: false
  podPlacementWebhook:
    enabled: false
agent:
  dataDir: /srv/tandem
  ports: {control: 17400, replication: 17401, nbd: 20809}
  tokenSecret:
    existingSecret: edge-shared-token
    existingSecretKey: shared
  nodeSelector:
    storage.tandem.dev/node: "true"
  tolerations:
  - key: storage
    operator: Equal
    value: dedicated
    effect: NoSchedule
  priorityClassName: system-node-critical
  nbdAllowedClients: [10.20.0.0/16, 127.0.0.1]
  maxInflightBytes: 512Mi
`), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := helm(t, "template", "edge", chart, "--namespace", ns, "--include-crds", "--skip-tests", "-f", values)
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs := decodeManifest(t, out)
		want := slices.DeleteFunc(workloadObjects("edge-tandem"), func(k objKey) bool {
			return k.kind == "Service" || strings.HasSuffix(k.name, "-webhook") || strings.HasSuffix(k.name, "-pod-placement")
		})
		for i := range want {
			if want[i].namespace != "" {
				want[i].namespace = ns
			}
		}
		want = append(want, objKey{"CustomResourceDefinition", "", "volumepairs.storage.tandem.dev"})
		want = append(want, metricsAuthObjects("edge-tandem")...)
		requireObjects(t, objs, want)
		for _, o := range objs {
			switch {
			case o.GetKind() == "Secret":
				t.Errorf("chart rendered Secret %s although agent.tokenSecret.existingSecret is set", o.GetName())
			case o.GetKind() == "Service":
				t.Errorf("chart rendered Service %s although manager.metricsService.enabled is false", o.GetName())
			}
		}
		checkWorkloads(t, objs, workloadExpect{
			prefix:      "edge-tandem",
			namespace:   ns,
			image:       "registry.example.com/storage/tandem:v9.9.9",
			tokenSecret: "edge-shared-token",
			tokenKey:    "shared",
			dataDir:     "/srv/tandem",
			ports:       [3]int32{17400, 17401, 20809},
			metricsPort: 9090,
			maxInflight: "512Mi",
		})
		if d := typed[appsv1.Deployment](t, findObject(objs, "Deployment", ns, "edge-tandem-manager")); d != nil {
			if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
				t.Errorf("manager replicas = %v, want 2", d.Spec.Replicas)
			}
		}
		if ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", ns, "edge-tandem-agent")); ds != nil {
			p := ds.Spec.Template.Spec
			if p.NodeSelector["storage.tandem.dev/node"] != "true" {
				t.Errorf("agent nodeSelector = %v, want storage.tandem.dev/node=true", p.NodeSelector)
			}
			if len(p.Tolerations) != 1 || p.Tolerations[0].Key != "storage" {
				t.Errorf("agent tolerations = %+v, want only the one from the values", p.Tolerations)
			}
			if p.PriorityClassName != "system-node-critical" {
				t.Errorf("agent priorityClassName = %q", p.PriorityClassName)
			}
			if args := p.Containers[0].Args; !slices.Contains(args, "--nbd-allowed-clients=10.20.0.0/16,127.0.0.1") {
				t.Errorf("agent args %v lack --nbd-allowed-clients=10.20.0.0/16,127.0.0.1", args)
			}
		}

		ensureNamespace(t, ns)
		// The Secret the release points at, made by its owner.
		sec := &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "edge-shared-token"},
			StringData: map[string]string{"shared": "not-a-real-token-but-long-enough"},
		}
		if err := k8s.Create(context.Background(), sec); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("create Secret: %v", err)
		}
		dryRunApply(t, out, len(objs))
	})
}

// metricsAuthObjects lists what the chart adds for manager.metricsSecure
// (on by default): the manager's right to review tokens and access, and the
// role a scraper needs.
func metricsAuthObjects(prefix string) []objKey {
	return []objKey{
		{"ClusterRole", "", prefix + "-manager-metrics-auth"},
		{"ClusterRoleBinding", "", prefix + "-manager-metrics-auth"},
		{"ClusterRole", "", prefix + "-metrics-reader"},
	}
}

// checkMetricsAuth: with secure metrics the manager is started with
// --metrics-secure, may create TokenReviews and SubjectAccessReviews, and
// the reader role allows exactly get on /metrics; without, none of it.
func checkMetricsAuth(t *testing.T, objs []*unstructured.Unstructured, prefix, namespace string, secure bool) {
	t.Helper()
	d := typed[appsv1.Deployment](t, findObject(objs, "Deployment", namespace, prefix+"-manager"))
	if d == nil {
		t.Fatal("no manager Deployment")
	}
	if c := container(t, d.Spec.Template.Spec, "manager"); c != nil && slices.Contains(c.Args, "--metrics-secure") != secure {
		t.Errorf("manager args %v: --metrics-secure present = %v, want %v", c.Args, !secure, secure)
	}
	auth := findObject(objs, "ClusterRole", "", prefix+"-manager-metrics-auth")
	reader := findObject(objs, "ClusterRole", "", prefix+"-metrics-reader")
	if !secure {
		if auth != nil || reader != nil {
			t.Error("metrics RBAC rendered without manager.metricsSecure")
		}
		return
	}
	if auth == nil || reader == nil {
		t.Fatal("metrics RBAC missing with manager.metricsSecure")
	}
	if got, want := permissions(typed[rbacv1.ClusterRole](t, auth).Rules), []string{
		"authentication.k8s.io/tokenreviews:create", "authorization.k8s.io/subjectaccessreviews:create",
	}; !slices.Equal(got, want) {
		t.Errorf("%s-manager-metrics-auth grants %v, want %v", prefix, got, want)
	}
	if r := typed[rbacv1.ClusterRole](t, reader).Rules; len(r) != 1 || !slices.Equal(r[0].NonResourceURLs, []string{"/metrics"}) || !slices.Equal(r[0].Verbs, []string{"get"}) || len(r[0].Resources) != 0 {
		t.Errorf("%s-metrics-reader rules = %+v, want get on /metrics only", prefix, r)
	}
	b := typed[rbacv1.ClusterRoleBinding](t, findObject(objs, "ClusterRoleBinding", "", prefix+"-manager-metrics-auth"))
	if b == nil || b.RoleRef.Name != prefix+"-manager-metrics-auth" || len(b.Subjects) != 1 || b.Subjects[0].Name != prefix+"-manager" || b.Subjects[0].Namespace != namespace {
		t.Errorf("%s-manager-metrics-auth binding = %+v, want the manager's service account", prefix, b)
	}
}

// TestHelmMonitoring renders the chart with every monitoring object on:
// the ServiceMonitor scrapes the managers over HTTPS with the scraper's
// token (plain HTTP without manager.metricsSecure), the PodMonitor the
// agents' control port, both under the job names the alerts and the
// dashboard select on; the PrometheusRule and the dashboard ConfigMap carry
// config/monitoring's files unchanged. The API server here has no
// Prometheus Operator CRDs, so nothing is applied.
func TestHelmMonitoring(t *testing.T) {
	chart := filepath.Join(repoRoot, "charts", "tandem")
	render := func(t *testing.T, extra ...string) []*unstructured.Unstructured {
		t.Helper()
		args := append([]string{"template", "tandem", chart, "--namespace", operatorNamespace,
			"--set", "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true",
			"--set", "monitoring.prometheusRule.enabled=true,monitoring.grafanaDashboard.enabled=true",
			"--set", "monitoring.serviceMonitor.labels.release=prom,monitoring.grafanaDashboard.namespace=grafana"}, extra...)
		out, err := helm(t, args...)
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		return decodeManifest(t, out)
	}
	endpoint := func(t *testing.T, objs []*unstructured.Unstructured) map[string]any {
		t.Helper()
		sm := findObject(objs, "ServiceMonitor", operatorNamespace, "tandem-manager")
		if sm == nil {
			t.Fatal("no ServiceMonitor tandem-manager")
		}
		if sm.GetLabels()["release"] != "prom" {
			t.Errorf("ServiceMonitor labels = %v, want release=prom from the values", sm.GetLabels())
		}
		eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
		if len(eps) != 1 {
			t.Fatalf("ServiceMonitor endpoints = %v", eps)
		}
		ep := eps[0].(map[string]any)
		if ep["port"] != "metrics" || ep["honorLabels"] != true {
			t.Errorf("ServiceMonitor endpoint = %v, want port metrics with honorLabels (the pairs' namespace label)", ep)
		}
		if !relabelsJob(ep, "tandem-manager") {
			t.Errorf("ServiceMonitor endpoint %v does not set job=tandem-manager", ep)
		}
		return ep
	}

	t.Run("secure", func(t *testing.T) {
		objs := render(t, "--set", "manager.metricsReaderSubjects[0].kind=ServiceAccount,manager.metricsReaderSubjects[0].name=prometheus,manager.metricsReaderSubjects[0].namespace=monitoring")
		checkMetricsAuth(t, objs, "tandem", operatorNamespace, true)
		ep := endpoint(t, objs)
		if ep["scheme"] != "https" || ep["bearerTokenFile"] != "/var/run/secrets/kubernetes.io/serviceaccount/token" {
			t.Errorf("ServiceMonitor endpoint = %v, want https with the service account token", ep)
		}
		rb := typed[rbacv1.ClusterRoleBinding](t, findObject(objs, "ClusterRoleBinding", "", "tandem-metrics-reader"))
		if rb == nil || rb.RoleRef.Name != "tandem-metrics-reader" || len(rb.Subjects) != 1 || rb.Subjects[0].Name != "prometheus" || rb.Subjects[0].Namespace != "monitoring" {
			t.Errorf("tandem-metrics-reader binding = %+v, want the subject from manager.metricsReaderSubjects", rb)
		}

		pm := findObject(objs, "PodMonitor", operatorNamespace, "tandem-agent")
		if pm == nil {
			t.Fatal("no PodMonitor tandem-agent")
		}
		if sel, _, _ := unstructured.NestedStringMap(pm.Object, "spec", "selector", "matchLabels"); sel["app.kubernetes.io/component"] != "agent" {
			t.Errorf("PodMonitor selector = %v, want the agents", sel)
		}
		peps, _, _ := unstructured.NestedSlice(pm.Object, "spec", "podMetricsEndpoints")
		if len(peps) != 1 || peps[0].(map[string]any)["port"] != "control" || !relabelsJob(peps[0].(map[string]any), "tandem-agent") {
			t.Errorf("PodMonitor endpoints = %v, want port control with job=tandem-agent", peps)
		}

		src, err := os.ReadFile(filepath.Join(repoRoot, "config", "monitoring", "prometheus-rules.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var want map[string]any
		if err := yaml.Unmarshal(src, &want); err != nil {
			t.Fatal(err)
		}
		pr := findObject(objs, "PrometheusRule", operatorNamespace, "tandem")
		if pr == nil {
			t.Fatal("no PrometheusRule tandem")
		}
		if spec, _, _ := unstructured.NestedMap(pr.Object, "spec"); !equality.Semantic.DeepEqual(spec, want) {
			t.Errorf("PrometheusRule spec differs from config/monitoring/prometheus-rules.yaml")
		}

		dash, err := os.ReadFile(filepath.Join(repoRoot, "config", "monitoring", "grafana-dashboard.json"))
		if err != nil {
			t.Fatal(err)
		}
		cm := findObject(objs, "ConfigMap", "grafana", "tandem-grafana-dashboard")
		if cm == nil {
			t.Fatal("no ConfigMap grafana/tandem-grafana-dashboard")
		}
		if cm.GetLabels()["grafana_dashboard"] != "1" {
			t.Errorf("dashboard ConfigMap labels = %v, want grafana_dashboard=1", cm.GetLabels())
		}
		if got, _, _ := unstructured.NestedString(cm.Object, "data", "tandem.json"); got != strings.TrimSuffix(string(dash), "\n") {
			t.Errorf("the dashboard ConfigMap's tandem.json differs from config/monitoring/grafana-dashboard.json")
		}
	})

	t.Run("plain HTTP", func(t *testing.T) {
		objs := render(t, "--set", "manager.metricsSecure=false")
		checkMetricsAuth(t, objs, "tandem", operatorNamespace, false)
		if ep := endpoint(t, objs); ep["scheme"] != nil || ep["bearerTokenFile"] != nil || ep["tlsConfig"] != nil {
			t.Errorf("ServiceMonitor endpoint = %v, want plain HTTP without a token", ep)
		}
	})

	t.Run("off by default", func(t *testing.T) {
		out, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace)
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		for _, o := range decodeManifest(t, out) {
			if strings.HasPrefix(o.GetAPIVersion(), "monitoring.coreos.com/") || o.GetKind() == "ConfigMap" {
				t.Errorf("default values render %s %s", o.GetKind(), o.GetName())
			}
		}
	})

	t.Run("a ServiceMonitor needs the metrics Service", func(t *testing.T) {
		if _, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace,
			"--set", "monitoring.serviceMonitor.enabled=true,manager.metricsService.enabled=false"); err == nil || !strings.Contains(err.Error(), "needs manager.metricsService.enabled") {
			t.Errorf("helm template = %v, want a failure naming manager.metricsService.enabled", err)
		}
	})
}

// relabelsJob: a scrape endpoint's relabelings set job to name.
func relabelsJob(ep map[string]any, name string) bool {
	rs, _ := ep["relabelings"].([]any)
	for _, r := range rs {
		if m, _ := r.(map[string]any); m["targetLabel"] == "job" && m["replacement"] == name {
			return true
		}
	}
	return false
}

// TestHelmInstallUpgradeKeepsToken installs the chart for real into the test
// API server (there is no kubelet, so no Pod runs), upgrades it and checks
// that the generated token survived the upgrade: agents and manager would
// otherwise stop trusting each other on every `helm upgrade`.
func TestHelmInstallUpgradeKeepsToken(t *testing.T) {
	const ns, release = "tandem-helm", "tandem-it"
	chart := filepath.Join(repoRoot, "charts", "tandem")
	ensureNamespace(t, ns)
	// The suite installed the CRD; TestHelmUpgradeChangesCRD has the chart
	// manage it.
	out, err := helm(t, "install", release, chart, "--namespace", ns, "--set", "crds.install=false")
	if err != nil {
		t.Fatalf("helm install: %v", err)
	}
	// The namespace has no Pod Security label: NOTES say so, with the
	// command that sets it.
	for _, want := range []string{
		"WARNING: namespace " + ns + " is not labelled pod-security.kubernetes.io/enforce=privileged",
		"kubectl label namespace " + ns + " pod-security.kubernetes.io/enforce=privileged --overwrite",
		"set agent.tokenSecret.existingSecret",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("helm install's NOTES lack %q:\n%s", want, out)
		}
	}
	t.Cleanup(func() {
		if _, err := helm(t, "uninstall", release, "--namespace", ns); err != nil {
			t.Errorf("helm uninstall: %v", err)
		}
	})
	secretName := release + "-agent-token"
	token := func() string {
		t.Helper()
		var s corev1.Secret
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: secretName}, &s); err != nil {
			t.Fatalf("get Secret %s: %v", secretName, err)
		}
		return string(s.Data["token"])
	}
	before := token()
	if len(before) < 32 {
		t.Fatalf("generated token %q is too short", before)
	}
	if _, err := helm(t, "upgrade", release, chart, "--namespace", ns, "--set", "crds.install=false,manager.replicas=2"); err != nil {
		t.Fatalf("helm upgrade: %v", err)
	}
	if after := token(); after != before {
		t.Errorf("token changed across helm upgrade: %q -> %q", before, after)
	}
	var d appsv1.Deployment
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: release + "-manager"}, &d); err != nil {
		t.Fatalf("get manager Deployment: %v", err)
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("manager replicas after upgrade = %v, want 2", d.Spec.Replicas)
	}
}

// TestHelmRBACMatchesGenerated checks that the chart's manager ClusterRole
// grants exactly what controller-gen generated into config/rbac/role.yaml
// from the controllers' markers (the chart cannot read files outside itself,
// so its copy is written by hand).
func TestHelmRBACMatchesGenerated(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatalf("read the generated ClusterRole (run `make manifests`): %v", err)
	}
	gen := findObject(decodeManifest(t, string(b)), "ClusterRole", "", "tandem-manager")
	if gen == nil {
		t.Fatal("config/rbac/role.yaml holds no ClusterRole tandem-manager")
	}
	out, err := helm(t, "template", "tandem", filepath.Join(repoRoot, "charts", "tandem"), "--namespace", operatorNamespace)
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	chart := findObject(decodeManifest(t, out), "ClusterRole", "", "tandem-manager")
	if chart == nil {
		t.Fatal("the chart renders no ClusterRole tandem-manager")
	}
	g := permissions(typed[rbacv1.ClusterRole](t, gen).Rules)
	c := permissions(typed[rbacv1.ClusterRole](t, chart).Rules)
	if !slices.Equal(g, c) {
		t.Errorf("chart ClusterRole differs from config/rbac/role.yaml\n only generated: %v\n only chart:     %v",
			difference(g, c), difference(c, g))
	}
}

// TestChartCRDsMatchConfig checks that both install paths ship the same CRDs:
// the chart's templates/crds render config/crd/bases plus the chart's labels
// and the keep policy, only when crds.install is true, and the chart has no
// crds/ directory left to define them a second time.
func TestChartCRDsMatchConfig(t *testing.T) {
	chart := filepath.Join(repoRoot, "charts", "tandem")
	if _, err := os.Stat(filepath.Join(chart, "crds")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("charts/tandem/crds exists (%v): Helm would install its CRDs besides templates/crds", err)
	}
	src, err := filepath.Glob(filepath.Join(repoRoot, "config", "crd", "bases", "*.yaml"))
	if err != nil || len(src) == 0 {
		t.Fatalf("config/crd/bases holds no CRD (%v)", err)
	}
	out, err := helm(t, "template", "tandem", chart, "--namespace", operatorNamespace)
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	var rendered []*unstructured.Unstructured
	for _, o := range decodeManifest(t, out) {
		if o.GetKind() == "CustomResourceDefinition" {
			rendered = append(rendered, o)
		}
	}
	if len(rendered) != len(src) {
		t.Errorf("the chart renders %d CRDs, config/crd/bases holds %d; run hack/sync-chart-crds.sh", len(rendered), len(src))
	}
	for _, f := range src {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		want := decodeManifest(t, string(b))[0]
		got := findObject(rendered, "CustomResourceDefinition", "", want.GetName())
		if got == nil {
			t.Errorf("the chart renders no CRD %s", want.GetName())
			continue
		}
		got = got.DeepCopy()
		if p := got.GetAnnotations()["helm.sh/resource-policy"]; p != "keep" {
			t.Errorf("CRD %s: annotation helm.sh/resource-policy = %q, want keep (an uninstall would delete every VolumePair)", got.GetName(), p)
		}
		if l := got.GetLabels()["app.kubernetes.io/managed-by"]; l != "Helm" {
			t.Errorf("CRD %s: label app.kubernetes.io/managed-by = %q, want Helm", got.GetName(), l)
		}
		a := got.GetAnnotations()
		delete(a, "helm.sh/resource-policy")
		got.SetAnnotations(a)
		got.SetLabels(nil)
		if !equality.Semantic.DeepEqual(got.Object, want.Object) {
			t.Errorf("the chart's CRD %s differs from %s; run hack/sync-chart-crds.sh", got.GetName(), filepath.Base(f))
		}
	}
	out, err = helm(t, "template", "tandem", chart, "--namespace", operatorNamespace, "--set", "crds.install=false")
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	for _, o := range decodeManifest(t, out) {
		if o.GetKind() == "CustomResourceDefinition" {
			t.Errorf("crds.install=false renders CRD %s", o.GetName())
		}
	}
}

// objKey names one object of a rendered manifest.
type objKey struct{ kind, namespace, name string }

// workloadObjects lists what both install paths create besides the
// Namespace, CRD and Secret, named with prefix ("tandem" for the kustomize
// tree and the usual Helm release).
func workloadObjects(prefix string) []objKey {
	ns := operatorNamespace
	return []objKey{
		{"ServiceAccount", ns, prefix + "-manager"},
		{"ServiceAccount", ns, prefix + "-agent"},
		{"ClusterRole", "", prefix + "-manager"},
		{"ClusterRoleBinding", "", prefix + "-manager"},
		{"Role", ns, prefix + "-leader-election"},
		{"RoleBinding", ns, prefix + "-leader-election"},
		{"Role", ns, prefix + "-agent"},
		{"RoleBinding", ns, prefix + "-agent"},
		// Nodes, read for the agents' NBD allow-list.
		{"ClusterRole", "", prefix + "-agent-nodes"},
		{"ClusterRoleBinding", "", prefix + "-agent-nodes"},
		{"Service", ns, prefix + "-manager-metrics"},
		{"Deployment", ns, prefix + "-manager"},
		{"DaemonSet", ns, prefix + "-agent"},
		// The CSI driver.
		{"CSIDriver", "", "csi.tandem.dev"},
		{"ServiceAccount", ns, prefix + "-csi-node"},
		{"ClusterRole", "", prefix + "-csi-node"},
		{"ClusterRoleBinding", "", prefix + "-csi-node"},
		{"Role", ns, prefix + "-csi-node"},
		{"RoleBinding", ns, prefix + "-csi-node"},
		{"DaemonSet", ns, prefix + "-csi-node"},
		{"StorageClass", "", "tandem"},
		// The Pod placement webhook.
		{"Service", ns, prefix + "-webhook"},
		{"MutatingWebhookConfiguration", "", prefix + "-pod-placement"},
		{"ClusterRole", "", prefix + "-manager-webhook"},
		{"ClusterRoleBinding", "", prefix + "-manager-webhook"},
		{"Role", ns, prefix + "-manager-webhook"},
		{"RoleBinding", ns, prefix + "-manager-webhook"},
	}
}

// checkCSI checks the CSI objects of a rendering: no attach step (the node
// plugin fences at NodeStageVolume, and may update VolumePairs for it), the
// node plugin privileged with the kubelet's directory mounted Bidirectional (or
// the Pods' mounts never reach the kubelet), replaced only on delete, and
// the StorageClass's parameters accepted by the driver.
// checkWebhook: the manager serves the Pod placement webhook on the port
// the Service targets, with the names the configuration and the RBAC use,
// and the configuration can never keep a Pod from being created.
func checkWebhook(t *testing.T, objs []*unstructured.Unstructured, prefix, namespace string) {
	t.Helper()
	d := typed[appsv1.Deployment](t, findObject(objs, "Deployment", namespace, prefix+"-manager"))
	mwc := typed[admissionregistrationv1.MutatingWebhookConfiguration](t, findObject(objs, "MutatingWebhookConfiguration", "", prefix+"-pod-placement"))
	svc := typed[corev1.Service](t, findObject(objs, "Service", namespace, prefix+"-webhook"))
	cr := typed[rbacv1.ClusterRole](t, findObject(objs, "ClusterRole", "", prefix+"-manager-webhook"))
	role := typed[rbacv1.Role](t, findObject(objs, "Role", namespace, prefix+"-manager-webhook"))
	if d == nil || mwc == nil || svc == nil || cr == nil || role == nil {
		return
	}
	c := container(t, d.Spec.Template.Spec, "manager")
	requireArgs(t, "manager", c.Args, "--webhook-port=9443", "--webhook-service="+prefix+"-webhook",
		"--webhook-configuration="+prefix+"-pod-placement", "--webhook-secret="+prefix+"-webhook-tls")
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == "webhook" && p.ContainerPort == 9443 }) {
		t.Errorf("manager ports %+v lack webhook 9443", c.Ports)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 443 || svc.Spec.Ports[0].TargetPort.StrVal != "webhook" {
		t.Errorf("Service %s ports %+v, want 443 -> webhook", svc.Name, svc.Spec.Ports)
	}
	if len(mwc.Webhooks) != 1 {
		t.Fatalf("%s: %d webhooks", mwc.Name, len(mwc.Webhooks))
	}
	w := mwc.Webhooks[0]
	ref := w.ClientConfig.Service
	if ref == nil || ref.Name != svc.Name || ref.Namespace != namespace || ref.Path == nil || *ref.Path != csi.PodPlacementPath {
		t.Errorf("%s calls %+v, want Service %s/%s path %s", mwc.Name, ref, namespace, svc.Name, csi.PodPlacementPath)
	}
	if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Ignore || w.TimeoutSeconds == nil || *w.TimeoutSeconds > 5 {
		t.Errorf("%s: failurePolicy %v, timeout %v; want Ignore and at most 5 s (a Pod must start without the manager)", mwc.Name, w.FailurePolicy, w.TimeoutSeconds)
	}
	if w.NamespaceSelector == nil || !slices.ContainsFunc(w.NamespaceSelector.MatchExpressions, func(e metav1.LabelSelectorRequirement) bool {
		return e.Operator == metav1.LabelSelectorOpNotIn && slices.Contains(e.Values, namespace)
	}) {
		t.Errorf("%s must leave the operator namespace %s out (its Pods start before the manager): %+v", mwc.Name, namespace, w.NamespaceSelector)
	}
	if !slices.ContainsFunc(cr.Rules, func(r rbacv1.PolicyRule) bool {
		return slices.Contains(r.Resources, "mutatingwebhookconfigurations") && slices.Equal(r.ResourceNames, []string{mwc.Name}) && slices.Contains(r.Verbs, "patch")
	}) {
		t.Errorf("ClusterRole %s must allow patching %s (and only it): %+v", cr.Name, mwc.Name, cr.Rules)
	}
	if !slices.ContainsFunc(role.Rules, func(r rbacv1.PolicyRule) bool {
		return slices.Contains(r.Resources, "secrets") && slices.Equal(r.ResourceNames, []string{prefix + "-webhook-tls"}) && slices.Contains(r.Verbs, "update")
	}) {
		t.Errorf("Role %s must allow updating the Secret %s-webhook-tls: %+v", role.Name, prefix, role.Rules)
	}
}

func checkCSI(t *testing.T, objs []*unstructured.Unstructured, prefix, namespace string) {
	t.Helper()
	drv := typed[storagev1.CSIDriver](t, findObject(objs, "CSIDriver", "", "csi.tandem.dev"))
	if drv == nil || drv.Spec.AttachRequired == nil || *drv.Spec.AttachRequired {
		t.Errorf("CSIDriver csi.tandem.dev: attachRequired must be false (the node plugin fences at NodeStageVolume; an attach step makes the kubelet wait for its next node status update): %+v", drv)
	}
	if role := typed[rbacv1.ClusterRole](t, findObject(objs, "ClusterRole", "", prefix+"-csi-node")); role != nil {
		canUpdate := slices.ContainsFunc(role.Rules, func(r rbacv1.PolicyRule) bool {
			return slices.Contains(r.Resources, "volumepairs") && slices.Contains(r.Verbs, "update")
		})
		canGetNodes := slices.ContainsFunc(role.Rules, func(r rbacv1.PolicyRule) bool {
			return slices.Contains(r.Resources, "nodes") && slices.Contains(r.Verbs, "get")
		})
		if !canUpdate || !canGetNodes {
			t.Errorf("ClusterRole %s-csi-node must allow update on volumepairs and get on nodes (the node-side publish): %+v", prefix, role.Rules)
		}
	}
	ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", namespace, prefix+"-csi-node"))
	if ds == nil {
		return
	}
	if ds.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
		t.Errorf("csi-node updateStrategy %q, want OnDelete (attached volumes are served by the plugin)", ds.Spec.UpdateStrategy.Type)
	}
	pod := ds.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("csi-node containers: %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	if !slices.Equal(c.Command, []string{"/usr/local/bin/agent", "csi-node"}) {
		t.Errorf("csi-node command %q", c.Command)
	}
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("csi-node is not privileged: its mounts cannot propagate to the kubelet")
	}
	bidi := false
	for _, m := range c.VolumeMounts {
		if m.MountPath == "/var/lib/kubelet" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional {
			bidi = true
		}
	}
	if !bidi {
		t.Error("csi-node does not mount /var/lib/kubelet with Bidirectional propagation")
	}
	if !pod.HostNetwork {
		t.Error("csi-node is not on the host network (writers are reached on node addresses)")
	}
	sc := typed[storagev1.StorageClass](t, findObject(objs, "StorageClass", "", "tandem"))
	if sc == nil || sc.Provisioner != "csi.tandem.dev" {
		t.Fatalf("StorageClass tandem: %+v", sc)
	}
	if err := csi.CheckParameters(sc.Parameters); err != nil {
		t.Errorf("StorageClass tandem: the driver refuses its parameters: %v", err)
	}
}

// requireObjects fails unless objs holds exactly the objects in want.
func requireObjects(t *testing.T, objs []*unstructured.Unstructured, want []objKey) {
	t.Helper()
	var got []string
	for _, o := range objs {
		got = append(got, fmt.Sprintf("%s %s/%s", o.GetKind(), o.GetNamespace(), o.GetName()))
	}
	var exp []string
	for _, k := range want {
		exp = append(exp, fmt.Sprintf("%s %s/%s", k.kind, k.namespace, k.name))
	}
	sort.Strings(got)
	sort.Strings(exp)
	if !slices.Equal(got, exp) {
		t.Fatalf("rendered objects:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(exp, "\n  "))
	}
}

// workloadExpect is what checkWorkloads expects of one rendering.
type workloadExpect struct {
	prefix, namespace, image string
	tokenSecret, tokenKey    string
	dataDir                  string   // default /var/lib/tandem
	ports                    [3]int32 // control, replication, NBD; default 7400, 7401, 10809
	metricsPort              int32    // default 8080
	tolerateAll              bool     // the agent tolerates every taint
	maxInflight              string   // --max-inflight-bytes; default 256Mi
	tlsHostPath              string   // tls.mode=hostPath: a second hostPath volume "tls" (checkTLSHostPath checks it)
}

// checkWorkloads checks the manager Deployment, the agent DaemonSet and the
// RBAC of one rendering against what docs/install.md promises.
func checkWorkloads(t *testing.T, objs []*unstructured.Unstructured, w workloadExpect) {
	t.Helper()
	if w.dataDir == "" {
		w.dataDir = "/var/lib/tandem"
	}
	if w.ports == [3]int32{} {
		w.ports = [3]int32{7400, 7401, 10809}
	}
	if w.metricsPort == 0 {
		w.metricsPort = 8080
	}
	if w.maxInflight == "" {
		w.maxInflight = "256Mi"
	}
	ns := w.namespace

	// The manager: non-root, read-only, no capabilities, the agreed flags;
	// two of them, never on one node, leaving a lost node soon.
	if d := typed[appsv1.Deployment](t, findObject(objs, "Deployment", ns, w.prefix+"-manager")); d != nil {
		p := d.Spec.Template.Spec
		if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
			t.Errorf("manager replicas = %v, want at least 2 (a standby for when the leader's node is lost)", d.Spec.Replicas)
		}
		if a := p.Affinity; a == nil || a.PodAntiAffinity == nil || len(a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution) != 1 ||
			a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].TopologyKey != "kubernetes.io/hostname" ||
			a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].LabelSelector == nil ||
			a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].LabelSelector.MatchLabels["app.kubernetes.io/component"] != "manager" {
			t.Errorf("manager affinity = %+v, want a required podAntiAffinity on the hostname against the other managers", p.Affinity)
		}
		fast := 0
		for _, tol := range p.Tolerations {
			if (tol.Key == "node.kubernetes.io/unreachable" || tol.Key == "node.kubernetes.io/not-ready") && tol.TolerationSeconds != nil && *tol.TolerationSeconds <= 60 {
				fast++
			}
		}
		if fast != 2 {
			t.Errorf("manager tolerations = %+v, want unreachable and not-ready for at most 60 s", p.Tolerations)
		}
		if p.ServiceAccountName != w.prefix+"-manager" {
			t.Errorf("manager serviceAccountName = %q", p.ServiceAccountName)
		}
		if p.HostNetwork {
			t.Error("manager uses the host network")
		}
		if sc := p.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
			t.Error("manager pod is not runAsNonRoot")
		}
		c := container(t, p, "manager")
		if c != nil {
			checkContainerHardening(t, "manager", p, c)
			if c.Image != w.image {
				t.Errorf("manager image = %q, want %q", c.Image, w.image)
			}
			requireArgs(t, "manager", c.Args,
				fmt.Sprintf("--metrics-bind-address=:%d", w.metricsPort),
				"--health-probe-bind-address=:8081",
				"--leader-elect",
				"--namespace=$(POD_NAMESPACE)",
				"--agent-token-file="+tokenFile)
			requireFieldEnv(t, "manager", c, "POD_NAMESPACE", "metadata.namespace")
			for _, pr := range []struct {
				name  string
				probe *corev1.Probe
				path  string
			}{{"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
				if pr.probe == nil || pr.probe.HTTPGet == nil || pr.probe.HTTPGet.Path != pr.path {
					t.Errorf("manager %s probe = %+v, want GET %s", pr.name, pr.probe, pr.path)
				}
			}
			if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
				t.Errorf("manager resources = %+v, want requests and a memory limit", c.Resources)
			}
			requireTokenMount(t, "manager", p, c, w)
		}
	}

	// The agent: host network, hostPath data dir, root without any
	// capability, never privileged.
	if ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", ns, w.prefix+"-agent")); ds != nil {
		p := ds.Spec.Template.Spec
		if p.ServiceAccountName != w.prefix+"-agent" {
			t.Errorf("agent serviceAccountName = %q", p.ServiceAccountName)
		}
		// A rolling update: one agent at a time, each ready for a while
		// before the next stops, and time to hand its writer roles over
		// (20 s), let clients follow (5 s) and shut down (23 s at worst).
		if u := ds.Spec.UpdateStrategy.RollingUpdate; u == nil || u.MaxUnavailable == nil || u.MaxUnavailable.IntValue() != 1 {
			t.Errorf("agent updateStrategy = %+v, want a rolling update with maxUnavailable 1", ds.Spec.UpdateStrategy)
		}
		if ds.Spec.MinReadySeconds < 5 {
			t.Errorf("agent minReadySeconds = %d, want at least 5", ds.Spec.MinReadySeconds)
		}
		if g := p.TerminationGracePeriodSeconds; g == nil || *g < 50 {
			t.Errorf("agent terminationGracePeriodSeconds = %v, want at least 50", g)
		}
		if !p.HostNetwork || p.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
			t.Errorf("agent hostNetwork = %v, dnsPolicy = %q; want true, ClusterFirstWithHostNet", p.HostNetwork, p.DNSPolicy)
		}
		if p.HostPID || p.HostIPC {
			t.Error("agent shares the host PID or IPC namespace")
		}
		var data *corev1.Volume
		for i := range p.Volumes {
			if p.Volumes[i].HostPath != nil {
				if w.tlsHostPath != "" && p.Volumes[i].Name == "tls" && p.Volumes[i].HostPath.Path == w.tlsHostPath {
					continue
				}
				if data != nil {
					t.Errorf("agent has more than one hostPath volume: %s and %s", data.Name, p.Volumes[i].Name)
				}
				data = &p.Volumes[i]
			}
		}
		if data == nil || data.HostPath.Path != w.dataDir || data.HostPath.Type == nil || *data.HostPath.Type != corev1.HostPathDirectoryOrCreate {
			t.Errorf("agent hostPath volume = %+v, want %s DirectoryOrCreate", data, w.dataDir)
		}
		if w.tolerateAll && !slices.ContainsFunc(p.Tolerations, func(tol corev1.Toleration) bool {
			return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
		}) {
			t.Errorf("agent tolerations = %+v, want {operator: Exists} by default", p.Tolerations)
		}
		c := container(t, p, "agent")
		if c != nil {
			checkContainerHardening(t, "agent", p, c)
			if c.Image != w.image {
				t.Errorf("agent image = %q, want %q", c.Image, w.image)
			}
			requireArgs(t, "agent", c.Args,
				"--node=$(NODE_NAME)",
				"--data-dir="+w.dataDir,
				fmt.Sprintf("--control-address=:%d", w.ports[0]),
				fmt.Sprintf("--replication-address=:%d", w.ports[1]),
				fmt.Sprintf("--nbd-address=:%d", w.ports[2]),
				"--token-file="+tokenFile,
				"--namespace=$(POD_NAMESPACE)",
				"--advertise-address=$(POD_IP)",
				"--max-inflight-bytes="+w.maxInflight)
			requireFieldEnv(t, "agent", c, "NODE_NAME", "spec.nodeName")
			requireFieldEnv(t, "agent", c, "POD_NAMESPACE", "metadata.namespace")
			requireFieldEnv(t, "agent", c, "POD_IP", "status.podIP")
			var ports []int32
			for _, cp := range c.Ports {
				ports = append(ports, cp.ContainerPort)
			}
			if !slices.Equal(ports, w.ports[:]) {
				t.Errorf("agent container ports = %v, want %v", ports, w.ports)
			}
			// Ready only when not stopping and not catching up (the
			// rolling update waits for it); alive as long as it answers.
			for _, pr := range []struct {
				name  string
				probe *corev1.Probe
				path  string
			}{{"startup", c.StartupProbe, "/healthz"}, {"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
				if pr.probe == nil || pr.probe.HTTPGet == nil || pr.probe.HTTPGet.Path != pr.path || pr.probe.HTTPGet.Port.String() != "control" {
					t.Errorf("agent %s probe = %+v, want GET %s on the control port", pr.name, pr.probe, pr.path)
				}
			}
			var mounted bool
			for _, m := range c.VolumeMounts {
				if data != nil && m.Name == data.Name && m.MountPath == w.dataDir && !m.ReadOnly {
					mounted = true
				}
			}
			if !mounted {
				t.Errorf("agent does not mount its hostPath read-write at %s: %+v", w.dataDir, c.VolumeMounts)
			}
			requireTokenMount(t, "agent", p, c, w)
		}
	}

	// RBAC: the agent has Leases in its namespace and, cluster-wide, reads
	// Nodes (its NBD allow-list), nothing else; with issued TLS
	// certificates also CSRs (checked below and in checkTLS).
	if r := typed[rbacv1.Role](t, findObject(objs, "Role", ns, w.prefix+"-agent")); r != nil {
		want := []string{
			"coordination.k8s.io/leases:create", "coordination.k8s.io/leases:get", "coordination.k8s.io/leases:list",
			"coordination.k8s.io/leases:patch", "coordination.k8s.io/leases:update", "coordination.k8s.io/leases:watch",
		}
		if got := permissions(r.Rules); !slices.Equal(got, want) {
			t.Errorf("agent Role grants %v, want %v", got, want)
		}
	}
	for _, o := range objs {
		if o.GetKind() != "ClusterRoleBinding" && o.GetKind() != "RoleBinding" {
			continue
		}
		b := typed[rbacv1.ClusterRoleBinding](t, o) // same shape as a RoleBinding
		for _, s := range b.Subjects {
			if s.Kind != rbacv1.ServiceAccountKind || s.Namespace != ns {
				t.Errorf("%s %s: subject %+v, want a ServiceAccount in %s", o.GetKind(), o.GetName(), s, ns)
			}
			if s.Name == w.prefix+"-agent" && o.GetKind() == "ClusterRoleBinding" && b.RoleRef.Name == w.prefix+"-agent-tls" {
				// Mutual TLS with issued certificates (tls.enabled,
				// config/tls): the agent asks for its certificate
				// with a CSR; the signer decides which identity it
				// gets, not RBAC.
				cr := typed[rbacv1.ClusterRole](t, findObject(objs, "ClusterRole", "", b.RoleRef.Name))
				if got, want := permissions(cr.Rules), []string{"certificates.k8s.io/certificatesigningrequests:create", "certificates.k8s.io/certificatesigningrequests:get",
					"certificates.k8s.io/certificatesigningrequests:list", "certificates.k8s.io/certificatesigningrequests:watch"}; !slices.Equal(got, want) {
					t.Errorf("ClusterRole %s grants the agent %v, want only %v", b.RoleRef.Name, got, want)
				}
				continue
			}
			if s.Name == w.prefix+"-agent" && o.GetKind() == "ClusterRoleBinding" {
				if b.RoleRef.Name != w.prefix+"-agent-nodes" {
					t.Errorf("ClusterRoleBinding %s gives the agent cluster-wide rights (%s)", o.GetName(), b.RoleRef.Name)
					continue
				}
				cr := typed[rbacv1.ClusterRole](t, findObject(objs, "ClusterRole", "", b.RoleRef.Name))
				if got, want := permissions(cr.Rules), []string{"/nodes:get", "/nodes:list", "/nodes:watch"}; !slices.Equal(got, want) {
					t.Errorf("ClusterRole %s grants the agent %v, want only %v", b.RoleRef.Name, got, want)
				}
			}
		}
	}
	if r := typed[rbacv1.Role](t, findObject(objs, "Role", ns, w.prefix+"-leader-election")); r != nil {
		got := permissions(r.Rules)
		// Every Lease the manager touches (leader election, agent
		// registrations, authority Leases) is in this namespace, granted
		// here and nowhere else.
		for _, p := range []string{"coordination.k8s.io/leases:get", "coordination.k8s.io/leases:create", "coordination.k8s.io/leases:update",
			"coordination.k8s.io/leases:delete", "/events:create"} {
			if !slices.Contains(got, p) {
				t.Errorf("the manager's namespaced Role lacks %s: %v", p, got)
			}
		}
	}
	if cr := typed[rbacv1.ClusterRole](t, findObject(objs, "ClusterRole", "", w.prefix+"-manager")); cr != nil {
		for _, p := range permissions(cr.Rules) {
			if strings.HasPrefix(p, "coordination.k8s.io/leases:") {
				t.Errorf("the manager's ClusterRole grants %s cluster-wide; Leases belong in its namespaced Role", p)
			}
		}
	}
}

// checkContainerHardening checks what both containers share: no privileged
// mode, no privilege escalation, every capability dropped and none added, a
// read-only root filesystem and the RuntimeDefault seccomp profile.
func checkContainerHardening(t *testing.T, what string, p corev1.PodSpec, c *corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("%s container has no securityContext", what)
		return
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s container is privileged", what)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s container allows privilege escalation", what)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s container root filesystem is writable", what)
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) != 0 {
		t.Errorf("%s container capabilities = %+v, want drop [ALL] and nothing added", what, sc.Capabilities)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil && p.SecurityContext != nil {
		seccomp = p.SecurityContext.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s seccomp profile = %+v, want RuntimeDefault", what, seccomp)
	}
}

// requireTokenMount checks that the token Secret's key is mounted read-only
// as tokenFile.
func requireTokenMount(t *testing.T, what string, p corev1.PodSpec, c *corev1.Container, w workloadExpect) {
	t.Helper()
	var vol *corev1.Volume
	for i := range p.Volumes {
		if s := p.Volumes[i].Secret; s != nil && s.SecretName == w.tokenSecret {
			vol = &p.Volumes[i]
		}
	}
	if vol == nil {
		t.Errorf("%s has no volume of Secret %s: %+v", what, w.tokenSecret, p.Volumes)
		return
	}
	if s := vol.Secret; len(s.Items) != 1 || s.Items[0].Key != w.tokenKey || s.Items[0].Path != "token" || (s.Optional != nil && *s.Optional) {
		t.Errorf("%s token volume = %+v, want key %q as file token, not optional", what, s, w.tokenKey)
	}
	if m := vol.Secret.DefaultMode; m == nil || *m&0o007 != 0 {
		t.Errorf("%s token file mode = %v, want no access for others", what, m)
	}
	for _, m := range c.VolumeMounts {
		if m.Name == vol.Name {
			if m.MountPath != tokenMountPath || !m.ReadOnly {
				t.Errorf("%s token mount = %+v, want read-only at %s", what, m, tokenMountPath)
			}
			return
		}
	}
	t.Errorf("%s does not mount the token volume", what)
}

func container(t *testing.T, p corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range p.Containers {
		if p.Containers[i].Name == name {
			return &p.Containers[i]
		}
	}
	t.Errorf("no container %q", name)
	return nil
}

func requireArgs(t *testing.T, what string, args []string, want ...string) {
	t.Helper()
	for _, a := range want {
		if !slices.Contains(args, a) {
			t.Errorf("%s args %v lack %q", what, args, a)
		}
	}
}

func requireFieldEnv(t *testing.T, what string, c *corev1.Container, name, field string) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == name {
			if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != field {
				t.Errorf("%s env %s = %+v, want fieldRef %s", what, name, e, field)
			}
			return
		}
	}
	t.Errorf("%s has no env %s", what, name)
}

// permissions flattens RBAC rules into sorted "group/resource:verb" strings,
// so rules that grant the same are equal however they are grouped.
func permissions(rules []rbacv1.PolicyRule) []string {
	set := map[string]bool{}
	for _, r := range rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					set[g+"/"+res+":"+v] = true
				}
			}
		}
		for _, u := range r.NonResourceURLs {
			for _, v := range r.Verbs {
				set[u+":"+v] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for p := range set {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

func difference(a, b []string) []string {
	var d []string
	for _, x := range a {
		if !slices.Contains(b, x) {
			d = append(d, x)
		}
	}
	return d
}

// decodeManifest splits a multi-document YAML stream into objects.
func decodeManifest(t *testing.T, manifest string) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifest), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs
			}
			t.Fatalf("decode manifest: %v", err)
		}
		if len(m) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
}

func findObject(objs []*unstructured.Unstructured, kind, namespace, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetNamespace() == namespace && o.GetName() == name {
			return o
		}
	}
	return nil
}

// typed converts u into a T; nil stays nil (the caller has already failed
// on a missing object through requireObjects).
func typed[T any](t *testing.T, u *unstructured.Unstructured) *T {
	t.Helper()
	if u == nil {
		return nil
	}
	v := new(T)
	if err := k8sruntime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, v, true); err != nil {
		t.Errorf("%s %s: %v", u.GetKind(), u.GetName(), err)
		return nil
	}
	return v
}

// ensureNamespace creates a namespace that later tests may share. It is not
// deleted: envtest runs no namespace controller, so a deleted namespace would
// stay Terminating and refuse new objects.
func ensureNamespace(t *testing.T, name string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := k8s.Create(context.Background(), ns); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", name, err)
	}
}

// dryRunApply has the API server validate and admit every object of manifest
// without storing it (kubectl apply --dry-run=server), and checks that it
// reported on all n of them.
func dryRunApply(t *testing.T, manifest string, n int) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := runTool(t, nil, "kubectl", "--kubeconfig", kubeconfig, "apply", "--dry-run=server", "-f", f)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(out, "(server dry run)"); got != n {
		t.Errorf("kubectl apply --dry-run=server reported %d objects, want %d:\n%s", got, n, out)
	}
}

// helm runs bin/helm against the test API server with its own, empty cache
// and configuration directories, and returns its standard output.
//
// helm template and helm lint judge the chart's kubeVersion against a
// Kubernetes version compiled into helm (v1.20 unless its build says
// otherwise), not against a server: they get the test API server's version
// unless args name one.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	home := t.TempDir()
	if len(args) > 0 && (args[0] == "template" || args[0] == "lint") && !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--kube-version") }) {
		args = append(args, "--kube-version", serverVersion(t))
	}
	return runTool(t, []string{
		"KUBECONFIG=" + kubeconfig,
		"HELM_CACHE_HOME=" + filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME=" + filepath.Join(home, "config"),
		"HELM_DATA_HOME=" + filepath.Join(home, "data"),
	}, "helm", args...)
}

// runTool runs bin/<tool> with env added to the environment and returns its
// standard output; a failure's error carries both outputs. Standard error
// stays out of the result, so warnings cannot corrupt a rendered manifest.
func runTool(t *testing.T, env []string, tool string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot, "bin", tool), args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w\n%s%s", tool, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// chartAppVersion reads appVersion from charts/tandem/Chart.yaml.
func chartAppVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "charts", "tandem", "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		AppVersion string `json:"appVersion"`
	}
	if err := utilyaml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return c.AppVersion
}
