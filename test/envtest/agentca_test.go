package envtest

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	certv1 "k8s.io/api/certificates/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/nodecert"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// TestAgentCSRSigner: agents impersonated as the agents' ServiceAccount
// with the node name a Pod-bound token carries (what kube-apiserver 1.30+
// puts in the requester's extra), holding only the RBAC the install gives
// them, ask for certificates through the real API server; the Signer, run
// by a manager against it, signs the one for the agent's own node and
// denies the one for another node, with the reason.
func TestAgentCSRSigner(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := newNamespace(t)
	sa := "tandem-agent"
	user := agentca.ServiceAccountUser(ns, sa)

	// The agents' grants of the install (charts/tandem/templates/agent-rbac.yaml,
	// config/tls): CSRs cluster-wide, the CA ConfigMap in the namespace.
	subject := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ns}}
	for _, o := range []client.Object{
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: ns + "-agent-tls"}, Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"certificatesigningrequests"}, Verbs: []string{"create", "get", "list", "watch"}},
		}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: ns + "-agent-tls"}, Subjects: subject,
			RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: ns + "-agent-tls"}},
		&rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "agent-tls", Namespace: ns}, Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{agentca.DefaultName}, Verbs: []string{"get", "watch"}},
		}},
		&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "agent-tls", Namespace: ns}, Subjects: subject,
			RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "agent-tls"}},
	} {
		if err := k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), o) })
	}

	ca, err := agentca.EnsureCA(ctx, k8s, ns, agentca.DefaultName, time.Now())
	if err != nil {
		t.Fatalf("EnsureCA: %v", err)
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: scheme, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := (&agentca.Signer{Client: mgr.GetClient(), CA: ca, Policy: agentca.Policy{Username: user, MaxLifetime: time.Hour}}).SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	}()

	agentOn := func(podNode string) kubernetes.Interface {
		c := rest.CopyConfig(cfg)
		c.Impersonate = rest.ImpersonationConfig{UserName: user, Extra: map[string][]string{agentca.NodeNameExtra: {podNode}}}
		cs, err := kubernetes.NewForConfig(c)
		if err != nil {
			t.Fatal(err)
		}
		return cs
	}
	issuer := func(podNode string) *nodecert.Issuer {
		return &nodecert.Issuer{Client: agentOn(podNode), Node: "node-a", Namespace: ns, Dir: filepath.Join(t.TempDir(), "tls"),
			Log: logr.Discard(), PollEvery: 50 * time.Millisecond, Wait: 30 * time.Second}
	}

	// The agent on node-a asks for node-a.
	good := issuer("node-a")
	if err := good.Ensure(ctx); err != nil {
		t.Fatalf("node-a's agent: %v", err)
	}
	src, err := tlsid.Load(good.Dir, tlsid.WithIdentity(tlsid.NodeIdentity("node-a")))
	if err != nil {
		t.Fatalf("load node-a's files: %v", err)
	}
	if got := src.NotAfter().Sub(src.NotBefore()); got != time.Hour+5*time.Minute {
		t.Errorf("lifetime %v, want the signer's cap 1h (+5m backdate)", got)
	}
	var csrs certv1.CertificateSigningRequestList
	if err := k8s.List(ctx, &csrs); err != nil {
		t.Fatal(err)
	}
	var approved bool
	for _, csr := range csrs.Items {
		if csr.Spec.Username != user || len(csr.Status.Certificate) == 0 {
			continue
		}
		for _, c := range csr.Status.Conditions {
			approved = approved || c.Type == certv1.CertificateApproved && c.Reason == agentca.ReasonApproved
		}
		if got := csr.Spec.Extra[agentca.NodeNameExtra]; len(got) != 1 || got[0] != "node-a" {
			t.Errorf("CSR %s: the API server recorded extra %v", csr.Name, csr.Spec.Extra)
		}
	}
	if !approved {
		t.Errorf("no signed CSR approved by the signer: %+v", csrs.Items)
	}

	// The agent on node-b asks for node-a: denied, and the agent says why.
	err = issuer("node-b").Issue(ctx)
	if err == nil || !strings.Contains(err.Error(), "Denied") || !strings.Contains(err.Error(), "the requesting Pod runs on node-b but the CSR asks for node-a") {
		t.Errorf("node-b's agent asking for node-a: %v, want denied with the reason", err)
	}
}
