package envtest

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestTLSInstallRenders: mutual TLS with issued certificates (Helm
// tls.enabled, kustomize config/tls) runs the manager with --agent-tls=issue
// and the agents with --tls-issue, probes the agents over HTTPS, gives the
// agents CSRs and the CA ConfigMap (read) and nothing else more, and the API
// server accepts it all. With tls.mode=hostPath the agents read their node's
// certificate from a hostPath directory (--tls-dir) and the manager its own
// from a Secret (--agent-tls-dir), with no CSR rights; missing values are
// refused by the schema and, without it, by the templates.
func TestTLSInstallRenders(t *testing.T) {
	ensureNamespace(t, operatorNamespace)
	t.Run("helm", func(t *testing.T) {
		out, err := helm(t, "template", "tandem", filepath.Join(repoRoot, "charts", "tandem"), "--namespace", operatorNamespace,
			"--skip-tests", "--set", "tls.enabled=true", "--set", "tls.maxLifetime=10m")
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs := decodeManifest(t, out)
		checkWorkloads(t, objs, workloadExpect{prefix: "tandem", namespace: operatorNamespace, image: "ghcr.io/tandem-storage/tandem:" + chartAppVersion(t),
			tokenSecret: "tandem-agent-token", tokenKey: "token", tolerateAll: true})
		checkTLS(t, objs, "tandem", "--agent-tls-max-lifetime=10m")
		checkCSINodeTLS(t, objs, "tandem", "/var/lib/tandem/tls")
		dryRunApply(t, out, len(objs))
	})
	t.Run("helm NBD TLS off", func(t *testing.T) {
		out, err := helm(t, "template", "tandem", filepath.Join(repoRoot, "charts", "tandem"), "--namespace", operatorNamespace,
			"--skip-tests", "--set", "tls.enabled=true", "--set", "tls.nbd=off")
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs := decodeManifest(t, out)
		if ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", operatorNamespace, "tandem-agent")); ds != nil {
			requireArgs(t, "agent", container(t, ds.Spec.Template.Spec, "agent").Args, "--nbd-tls=off")
		}
		checkCSINodeTLS(t, objs, "tandem", "")
	})
	t.Run("helm hostPath", func(t *testing.T) {
		out, err := helm(t, "template", "tandem", filepath.Join(repoRoot, "charts", "tandem"), "--namespace", operatorNamespace, "--skip-tests",
			"--set", "tls.enabled=true", "--set", "tls.mode=hostPath", "--set", "tls.hostPath.agentDir=/etc/tandem-node-tls", "--set", "tls.secret.managerSecretName=tandem-manager-tls")
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs := decodeManifest(t, out)
		checkWorkloads(t, objs, workloadExpect{prefix: "tandem", namespace: operatorNamespace, image: "ghcr.io/tandem-storage/tandem:" + chartAppVersion(t),
			tokenSecret: "tandem-agent-token", tokenKey: "token", tolerateAll: true, tlsHostPath: "/etc/tandem-node-tls"})
		checkTLSHostPath(t, objs, "tandem", "/etc/tandem-node-tls", "tandem-manager-tls")
		checkCSINodeTLS(t, objs, "tandem", "/etc/tandem-node-tls")
		dryRunApply(t, out, len(objs))
	})
	t.Run("helm hostPath needs its values", func(t *testing.T) {
		chart := filepath.Join(repoRoot, "charts", "tandem")
		base := []string{"template", "tandem", chart, "--namespace", operatorNamespace, "--set", "tls.enabled=true", "--set", "tls.mode=hostPath"}
		for _, c := range []struct {
			name string
			args []string
			want string
		}{
			{"schema: no agentDir", []string{"--set", "tls.secret.managerSecretName=m"}, "/tls/hostPath/agentDir"},
			{"schema: no managerSecretName", []string{"--set", "tls.hostPath.agentDir=/x"}, "/tls/secret/managerSecretName"},
			{"schema: relative agentDir", []string{"--set", "tls.hostPath.agentDir=x", "--set", "tls.secret.managerSecretName=m"}, "/tls/hostPath/agentDir"},
			{"template: no agentDir", []string{"--skip-schema-validation", "--set", "tls.secret.managerSecretName=m"}, "tls.mode=hostPath needs tls.hostPath.agentDir"},
			{"template: no managerSecretName", []string{"--skip-schema-validation", "--set", "tls.hostPath.agentDir=/x"}, "tls.mode=hostPath needs tls.secret.managerSecretName"},
		} {
			if _, err := helm(t, append(slices.Clone(base), c.args...)...); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: helm template = %v, want an error naming %q", c.name, err, c.want)
			}
		}
		if _, err := helm(t, "template", "tandem", chart, "--set", "tls.mode=bogus"); err == nil || !strings.Contains(err.Error(), "/tls/mode") {
			t.Errorf("tls.mode=bogus: helm template = %v, want a schema error naming /tls/mode", err)
		}
	})
	t.Run("helm default is off", func(t *testing.T) {
		out, err := helm(t, "template", "tandem", filepath.Join(repoRoot, "charts", "tandem"), "--namespace", operatorNamespace, "--skip-tests")
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		objs := decodeManifest(t, out)
		if o := findObject(objs, "ClusterRole", "", "tandem-agent-tls"); o != nil {
			t.Error("tls.enabled=false renders the agents' CSR rights")
		}
		if ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", operatorNamespace, "tandem-agent")); ds != nil {
			if c := container(t, ds.Spec.Template.Spec, "agent"); c != nil && slices.Contains(c.Args, "--tls-issue") {
				t.Error("tls.enabled=false runs the agent with --tls-issue")
			}
		}
	})
	t.Run("kustomize", func(t *testing.T) {
		out, err := runTool(t, nil, "kubectl", "kustomize", filepath.Join(repoRoot, "config", "tls"))
		if err != nil {
			t.Fatalf("kubectl kustomize config/tls: %v", err)
		}
		objs := decodeManifest(t, out)
		checkWorkloads(t, objs, workloadExpect{prefix: "tandem", namespace: operatorNamespace, image: "ghcr.io/tandem-storage/tandem:dev",
			tokenSecret: "tandem-agent-token", tokenKey: "token", tolerateAll: true})
		checkTLS(t, objs, "tandem")
		checkCSINodeTLS(t, objs, "tandem", "/var/lib/tandem/tls")
		dryRunApply(t, out, len(objs))
	})
}

// checkCSINodeTLS: the CSI node plugin upgrades its NBD connections with
// its node's agent certificate, the host directory hostDir mounted
// read-only where its --tls-dir points; hostDir "" means it does not use
// TLS (no --tls-dir).
func checkCSINodeTLS(t *testing.T, objs []*unstructured.Unstructured, prefix, hostDir string) {
	t.Helper()
	ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", operatorNamespace, prefix+"-csi-node"))
	if ds == nil {
		t.Errorf("no DaemonSet %s-csi-node", prefix)
		return
	}
	c := container(t, ds.Spec.Template.Spec, "csi-node")
	i := slices.IndexFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--tls-dir=") })
	if hostDir == "" {
		if i >= 0 {
			t.Errorf("csi-node args %v: --tls-dir although NBD TLS is off", c.Args)
		}
		return
	}
	if i < 0 {
		t.Errorf("csi-node args %v: no --tls-dir (NBD over TLS)", c.Args)
		return
	}
	dir := strings.TrimPrefix(c.Args[i], "--tls-dir=")
	m := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == dir })
	if m < 0 || !c.VolumeMounts[m].ReadOnly {
		t.Errorf("csi-node: no read-only mount at %s: %+v", dir, c.VolumeMounts)
		return
	}
	if !slices.ContainsFunc(ds.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool {
		return v.Name == c.VolumeMounts[m].Name && v.HostPath != nil && v.HostPath.Path == hostDir
	}) {
		t.Errorf("csi-node: the volume at %s is not the host directory %s: %+v", dir, hostDir, ds.Spec.Template.Spec.Volumes)
	}
}

func checkTLS(t *testing.T, objs []*unstructured.Unstructured, prefix string, managerArgs ...string) {
	t.Helper()
	ns := operatorNamespace
	ca := prefix + "-agent-ca"
	if d := typed[appsv1.Deployment](t, findObject(objs, "Deployment", ns, prefix+"-manager")); d != nil {
		c := container(t, d.Spec.Template.Spec, "manager")
		requireArgs(t, "manager", c.Args, append([]string{"--agent-tls=issue", "--agent-service-account=" + prefix + "-agent", "--agent-ca-name=" + ca}, managerArgs...)...)
	}
	if ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", ns, prefix+"-agent")); ds != nil {
		c := container(t, ds.Spec.Template.Spec, "agent")
		requireArgs(t, "agent", c.Args, "--tls-issue", "--tls-ca-configmap="+ca)
		for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
			if p == nil || p.HTTPGet == nil || p.HTTPGet.Scheme != corev1.URISchemeHTTPS {
				t.Errorf("agent %s probe %+v, want HTTPS (the control API serves TLS)", name, p)
			}
		}
	}
	if b := typed[rbacv1.ClusterRoleBinding](t, findObject(objs, "ClusterRoleBinding", "", prefix+"-agent-tls")); b == nil || b.RoleRef.Name != prefix+"-agent-tls" {
		t.Errorf("no ClusterRoleBinding %s-agent-tls for the agents' CSRs", prefix)
	}
	if r := typed[rbacv1.Role](t, findObject(objs, "Role", ns, prefix+"-agent-tls")); r == nil {
		t.Errorf("no Role %s-agent-tls", prefix)
	} else if got, want := permissions(r.Rules), []string{"/configmaps:get", "/configmaps:watch"}; !slices.Equal(got, want) ||
		!slices.ContainsFunc(r.Rules, func(p rbacv1.PolicyRule) bool { return slices.Equal(p.ResourceNames, []string{ca}) }) || len(r.Rules) != 1 {
		t.Errorf("Role %s grants the agent %v (%+v), want only get and watch of the ConfigMap %s", r.Name, got, r.Rules, ca)
	}
	if r := typed[rbacv1.Role](t, findObject(objs, "Role", ns, prefix+"-manager-agent-ca")); r == nil {
		t.Errorf("no Role %s-manager-agent-ca", prefix)
	} else {
		for _, p := range []string{"/secrets:get", "/secrets:create", "/secrets:update", "/configmaps:get", "/configmaps:create", "/configmaps:update"} {
			if !slices.Contains(permissions(r.Rules), p) {
				t.Errorf("Role %s lacks %s: %+v", r.Name, p, r.Rules)
			}
		}
	}
	if cr := typed[rbacv1.ClusterRole](t, findObject(objs, "ClusterRole", "", prefix+"-manager")); cr != nil {
		if !slices.ContainsFunc(cr.Rules, func(r rbacv1.PolicyRule) bool {
			return slices.Contains(r.Resources, "signers") && slices.Equal(r.ResourceNames, []string{"tandem.dev/agent"}) && slices.Contains(r.Verbs, "sign") && slices.Contains(r.Verbs, "approve")
		}) {
			t.Errorf("ClusterRole %s-manager cannot approve and sign for tandem.dev/agent: %+v", prefix, cr.Rules)
		}
	}
}

// checkTLSHostPath: tls.mode=hostPath mounts dir read-only on the agents
// (--tls-dir) and the Secret secret on the manager (--agent-tls-dir), probes
// over HTTPS, and renders none of the issuing mode's flags and rights.
func checkTLSHostPath(t *testing.T, objs []*unstructured.Unstructured, prefix, dir, secret string) {
	t.Helper()
	ns := operatorNamespace
	mounted := func(what string, spec corev1.PodSpec, c *corev1.Container, path string, src func(corev1.Volume) bool) {
		t.Helper()
		i := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == path })
		if i < 0 || !c.VolumeMounts[i].ReadOnly {
			t.Errorf("%s: no read-only mount at %s: %+v", what, path, c.VolumeMounts)
			return
		}
		if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == c.VolumeMounts[i].Name && src(v) }) {
			t.Errorf("%s: the volume %s is not the expected source: %+v", what, c.VolumeMounts[i].Name, spec.Volumes)
		}
	}
	if d := typed[appsv1.Deployment](t, findObject(objs, "Deployment", ns, prefix+"-manager")); d != nil {
		c := container(t, d.Spec.Template.Spec, "manager")
		requireArgs(t, "manager", c.Args, "--agent-tls-dir=/etc/tandem/agent-tls")
		if slices.ContainsFunc(c.Args, func(a string) bool {
			return strings.HasPrefix(a, "--agent-tls=") || strings.HasPrefix(a, "--agent-ca-name=")
		}) {
			t.Errorf("manager args %v: the issuing mode's flags in hostPath mode", c.Args)
		}
		mounted("manager", d.Spec.Template.Spec, c, "/etc/tandem/agent-tls", func(v corev1.Volume) bool {
			return v.Secret != nil && v.Secret.SecretName == secret
		})
	}
	if ds := typed[appsv1.DaemonSet](t, findObject(objs, "DaemonSet", ns, prefix+"-agent")); ds != nil {
		c := container(t, ds.Spec.Template.Spec, "agent")
		requireArgs(t, "agent", c.Args, "--tls-dir=/etc/tandem/tls")
		if slices.ContainsFunc(c.Args, func(a string) bool { return a == "--tls-issue" || strings.HasPrefix(a, "--tls-ca-configmap=") }) {
			t.Errorf("agent args %v: the issuing mode's flags in hostPath mode", c.Args)
		}
		mounted("agent", ds.Spec.Template.Spec, c, "/etc/tandem/tls", func(v corev1.Volume) bool {
			return v.HostPath != nil && v.HostPath.Path == dir && v.HostPath.Type != nil && *v.HostPath.Type == corev1.HostPathDirectory
		})
		for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
			if p == nil || p.HTTPGet == nil || p.HTTPGet.Scheme != corev1.URISchemeHTTPS {
				t.Errorf("agent %s probe %+v, want HTTPS (the control API serves TLS)", name, p)
			}
		}
	}
	for _, o := range []struct{ kind, ns, name string }{
		{"ClusterRole", "", prefix + "-agent-tls"}, {"ClusterRoleBinding", "", prefix + "-agent-tls"},
		{"Role", ns, prefix + "-agent-tls"}, {"Role", ns, prefix + "-manager-agent-ca"},
	} {
		if findObject(objs, o.kind, o.ns, o.name) != nil {
			t.Errorf("hostPath mode renders %s %s, a right of the issuing mode", o.kind, o.name)
		}
	}
}
