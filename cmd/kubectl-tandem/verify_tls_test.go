package main

import (
	"context"
	"crypto/ecdsa"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/tandem-storage/tandem/internal/pki"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// tlsAgent is a fake agent serving mutual TLS with a certificate of ca: it
// requires a client certificate of ca and records the identities that
// called it. Every replica of prod/db holds zeros.
type tlsAgent struct {
	srv *httptest.Server
	mu  sync.Mutex
	ids map[tlsid.Identity]bool
}

func newTLSAgent(t *testing.T, ca *tlsidtest.CA, node string) *tlsAgent {
	t.Helper()
	a := &tlsAgent{ids: map[tlsid.Identity]bool{}}
	vp := testPair()
	rs := vp.Spec.RegionSizeBytes()
	a.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := tlsid.PeerIdentity(*r.TLS)
		if err != nil {
			http.Error(w, `{"error":"no identity"}`, http.StatusForbidden)
			return
		}
		a.mu.Lock()
		a.ids[id] = true
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/v1/volumes/prod/db":
			_ = json.NewEncoder(w).Encode(agentapi.Status{Name: "prod/db", Size: vp.Spec.SizeBytes(), RegionSize: rs, Role: agentapi.RoleBackup})
		case "/v1/volumes/prod/db/checksums":
			first, _ := strconv.Atoi(r.URL.Query().Get("first"))
			count, _ := strconv.Atoi(r.URL.Query().Get("count"))
			sums := make([]string, count)
			for i := range sums {
				sums[i] = "zeros"
			}
			_ = json.NewEncoder(w).Encode(agentapi.Checksums{RegionSize: rs, First: uint32(first), Algorithm: agentapi.ChecksumAlgorithm, Sums: sums})
		default:
			http.NotFound(w, r)
		}
	}))
	certPEM, keyPEM := ca.Issue(t, tlsid.NodeIdentity(node))
	src, err := tlsid.FromPEM(certPEM, keyPEM, ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	a.srv.TLS = src.ServerConfig(true)
	a.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are expected
	a.srv.StartTLS()
	t.Cleanup(a.srv.Close)
	return a
}

func (a *tlsAgent) saw() []tlsid.Identity {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []tlsid.Identity
	for id := range a.ids {
		out = append(out, id)
	}
	return out
}

// managerDeployment is a manager Deployment of the install in storage with
// args.
func managerDeployment(args ...string) *appsv1.Deployment {
	l := map[string]string{"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "manager"}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: "storage", Name: "tandem-manager", Labels: l},
		Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: l}, Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Labels: l},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "manager", Image: "tandem", Args: args}}},
		}},
	}
}

// TestVerifyTLS: against agents that serve mutual TLS, verify signs itself
// a manager certificate with the CA of the install's Secret (named by the
// manager's --agent-ca-name, or tandem-agent-ca), or uses --tls-dir; no
// right to read that Secret, or no Secret, is an error that says which and
// what to do.
func TestVerifyTLS(t *testing.T) {
	caPEM, keyPEM, caCert, caKey, err := pki.NewCA("tandem-agent-ca", 1, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ca := &tlsidtest.CA{Cert: caCert, Key: caKey.(*ecdsa.PrivateKey), PEM: caPEM}
	caSecret := func(name string) *corev1.Secret {
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "storage", Name: name}, Data: map[string][]byte{"ca.crt": caPEM, "ca.key": keyPEM}}
	}
	a, b := newTLSAgent(t, ca, "node-a"), newTLSAgent(t, ca, "node-b")
	base := []client.Object{testPair(), agentLease("node-a", a.srv.URL, time.Second), agentLease("node-b", b.srv.URL, time.Second),
		agentDS("storage", "tandem-agent", "tandem-agent-token", "token"),
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "storage", Name: "tandem-agent-token"}, Data: map[string][]byte{"token": []byte("s3cret")}}}
	forbidCA := interceptor.Funcs{Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
		if _, ok := obj.(*corev1.Secret); ok && key.Name == "tandem-agent-ca" {
			return apierrors.NewForbidden(schema.GroupResource{Resource: "secrets"}, key.Name, errors.New(`User "alice" cannot get it`))
		}
		return c.Get(ctx, key, obj, opts...)
	}}
	managerDir := ca.Dir(t, tlsid.Manager)
	// A certificate the agents do not trust, with their CA as ca.crt.
	untrusted := t.TempDir()
	cert, key := tlsidtest.NewCA(t, "other").Issue(t, tlsid.Manager)
	tlsidtest.WriteFiles(t, untrusted, cert, key, caPEM)
	for _, tt := range []struct {
		name  string
		objs  []client.Object
		funcs interceptor.Funcs
		args  []string
		want  []string // in the error; none: verify succeeds as the manager
	}{
		{name: "the default CA Secret", objs: append([]client.Object{caSecret("tandem-agent-ca")}, base...)},
		{name: "the manager's --agent-ca-name", objs: append([]client.Object{caSecret("my-ca"), managerDeployment("--agent-tls=issue", "--agent-ca-name", "my-ca")}, base...)},
		{name: "--tls-dir, with no right to read the CA", objs: base, funcs: forbidCA, args: []string{"--tls-dir", managerDir}},
		{name: "no right to read the CA", objs: append([]client.Object{caSecret("tandem-agent-ca")}, base...), funcs: forbidCA, want: []string{
			"the agents serve mutual TLS, and verify calls them with a manager certificate it signs with their CA, read from secret storage/tandem-agent-ca",
			"you may not read that Secret; get permission to get secrets/tandem-agent-ca in namespace storage, or pass --tls-dir DIR holding a manager certificate (tls.crt, tls.key, ca.crt"}},
		{name: "no CA Secret", objs: append([]client.Object{managerDeployment("--agent-ca-name=my-ca")}, base...), want: []string{
			"the agents serve mutual TLS, but their CA's secret storage/my-ca (the --agent-ca-name of Deployment storage/tandem-manager) does not exist"}},
		{name: "a CA Secret without its key", objs: append([]client.Object{&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "storage", Name: "tandem-agent-ca"}, Data: map[string][]byte{"ca.crt": caPEM}}}, base...), want: []string{
			"agent CA Secret storage/tandem-agent-ca holds no usable CA (ca.crt and ca.key)"}},
		{name: "--tls-dir of another CA", objs: base, args: []string{"--tls-dir", tlsidtest.NewCA(t, "other").Dir(t, tlsid.Manager)}, want: []string{
			"the TLS handshake with the agent of node node-a (" + a.srv.URL + ") failed: the agents' certificates and the client certificate must both be of the install's CA"}},
		{name: "--tls-dir with a certificate the agents do not trust", objs: base, args: []string{"--tls-dir", untrusted}, want: []string{
			"the TLS handshake with the agent of node node-a (" + a.srv.URL + ") failed"}},
		{name: "--tls-dir without the files", objs: base, args: []string{"--tls-dir", t.TempDir()}, want: []string{"--tls-dir: "}},
	} {
		a.ids, b.ids = map[tlsid.Identity]bool{}, map[tlsid.Identity]bool{}
		res := runPluginWith(t, tt.objs, tt.funcs, func(kubeconfig string) []string {
			return append([]string{"--kubeconfig", kubeconfig, "-n", "prod", "verify", "db"}, tt.args...)
		})
		if len(tt.want) > 0 {
			var ee *exitError
			if !errors.As(res.err, &ee) || ee.code != 2 {
				t.Errorf("%s: %v; want exit status 2", tt.name, res.err)
				continue
			}
			for _, w := range tt.want {
				if !strings.Contains(res.err.Error(), w) {
					t.Errorf("%s: error lacks %q:\n%v", tt.name, w, res.err)
				}
			}
			continue
		}
		if res.err != nil {
			t.Errorf("%s: %v\n%s", tt.name, res.err, res.stderr)
			continue
		}
		for _, ag := range []*tlsAgent{a, b} {
			if got := ag.saw(); len(got) != 1 || got[0] != tlsid.Manager {
				t.Errorf("%s: the agent saw %v, want only %s", tt.name, got, tlsid.Manager)
			}
		}
	}
}

func TestFlagValue(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
		ok   bool
	}{
		{[]string{"--agent-ca-name=x"}, "x", true},
		{[]string{"-agent-ca-name=x"}, "x", true},
		{[]string{"--agent-ca-name", "y"}, "y", true},
		{[]string{"--agent-ca-name=x", "-agent-ca-name", "z"}, "z", true},
		{[]string{"agent-ca-name", "y"}, "", false},
		{[]string{"--agent-ca-name"}, "", false},
		{[]string{"--agent-ca-names=x"}, "", false},
	} {
		if got, ok := flagValue(tt.args, "agent-ca-name"); got != tt.want || ok != tt.ok {
			t.Errorf("flagValue(%q) = %q, %v; want %q, %v", tt.args, got, ok, tt.want, tt.ok)
		}
	}
}
