package agentca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

const (
	ns      = "tandem-system"
	agentSA = "system:serviceaccount:tandem-system:tandem-agent"
)

var t0 = time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)

func newClient(objs ...client.Object) client.Client {
	s := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(s)
	return fake.NewClientBuilder().WithScheme(s).WithObjects(objs...).
		WithStatusSubresource(&certv1.CertificateSigningRequest{}).Build()
}

// request makes a PEM CSR for key naming uris (and dns).
func request(t *testing.T, key crypto.Signer, uris []string, dns ...string) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{DNSNames: dns}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func ecKey(t *testing.T, c elliptic.Curve) crypto.Signer {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestEnsureCAKeepsItsCA(t *testing.T) {
	ctx := context.Background()
	c := newClient()
	ca, err := agentca.EnsureCA(ctx, c, ns, agentca.DefaultName, t0)
	if err != nil {
		t.Fatalf("EnsureCA: %v", err)
	}
	var cm corev1.ConfigMap
	if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: agentca.DefaultName}, &cm); err != nil || cm.Data[agentca.KeyCACert] != string(ca.PEM) {
		t.Fatalf("ConfigMap: %v, ca.crt %q; want the CA", err, cm.Data[agentca.KeyCACert])
	}
	// A stale ConfigMap (a GitOps sync wrote something else) is set right;
	// the CA is the same.
	cm.Data[agentca.KeyCACert] = "stale"
	if err := c.Update(ctx, &cm); err != nil {
		t.Fatal(err)
	}
	again, err := agentca.EnsureCA(ctx, c, ns, agentca.DefaultName, t0.Add(time.Hour))
	if err != nil {
		t.Fatalf("EnsureCA again: %v", err)
	}
	if string(again.PEM) != string(ca.PEM) {
		t.Error("a second EnsureCA made a new CA")
	}
	if err := c.Get(ctx, client.ObjectKeyFromObject(&cm), &cm); err != nil || cm.Data[agentca.KeyCACert] != string(ca.PEM) {
		t.Errorf("ConfigMap after EnsureCA: %v, ca.crt %q; want the CA again", err, cm.Data[agentca.KeyCACert])
	}
	// A damaged Secret is an error, never replaced.
	var s corev1.Secret
	if err := c.Get(ctx, client.ObjectKeyFromObject(&cm), &s); err != nil {
		t.Fatal(err)
	}
	s.Data["ca.key"] = []byte("garbage")
	if err := c.Update(ctx, &s); err != nil {
		t.Fatal(err)
	}
	if _, err := agentca.EnsureCA(ctx, c, ns, agentca.DefaultName, t0); err == nil || !strings.Contains(err.Error(), "never replaced") {
		t.Errorf("EnsureCA on a damaged Secret: %v, want an error saying it is not replaced", err)
	}
}

func TestSigner(t *testing.T) {
	ctx := context.Background()
	nodeA := string(tlsid.NodeIdentity("node-a"))
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	type want struct {
		signed  bool
		cond    certv1.RequestConditionType // "" for none
		message string                      // in the condition's message
	}
	for _, tc := range []struct {
		name     string
		edit     func(*certv1.CertificateSigningRequest)
		key      crypto.Signer
		uris     []string
		dns      []string
		lifetime time.Duration // of the certificate, when signed
		noNode   bool          // no Node object node-a
		want     want
	}{
		{name: "own node", lifetime: 24 * time.Hour, want: want{signed: true, cond: certv1.CertificateApproved}},
		{name: "own node, Node not found: its name only", lifetime: 24 * time.Hour, noNode: true, want: want{signed: true, cond: certv1.CertificateApproved}},
		{name: "own node, P-384, short expirationSeconds", key: ecKey(t, elliptic.P384()), lifetime: 15 * time.Minute,
			edit: func(c *certv1.CertificateSigningRequest) { c.Spec.ExpirationSeconds = ptr.To[int32](900) },
			want: want{signed: true, cond: certv1.CertificateApproved}},
		{name: "expirationSeconds above the cap", lifetime: 24 * time.Hour,
			edit: func(c *certv1.CertificateSigningRequest) { c.Spec.ExpirationSeconds = ptr.To[int32](7 * 86400) },
			want: want{signed: true, cond: certv1.CertificateApproved}},
		{name: "other node's Pod", edit: func(c *certv1.CertificateSigningRequest) {
			c.Spec.Extra[agentca.NodeNameExtra] = certv1.ExtraValue{"node-b"}
		}, want: want{cond: certv1.CertificateDenied, message: "the requesting Pod runs on node-b but the CSR asks for node-a"}},
		{name: "no node in extra (not a Pod-bound token)", edit: func(c *certv1.CertificateSigningRequest) { c.Spec.Extra = nil },
			want: want{cond: certv1.CertificateDenied, message: "Pod-bound ServiceAccount token"}},
		{name: "wrong user", edit: func(c *certv1.CertificateSigningRequest) { c.Spec.Username = "system:serviceaccount:default:x" },
			want: want{cond: certv1.CertificateDenied, message: `the requester is "system:serviceaccount:default:x"`}},
		{name: "extra DNS SAN", dns: []string{"node-a"}, want: want{cond: certv1.CertificateDenied, message: "DNS, IP or email SANs"}},
		{name: "two URIs", uris: []string{nodeA, "https://example.com/x"}, want: want{cond: certv1.CertificateDenied, message: "2 URI SANs"}},
		{name: "manager identity", uris: []string{string(tlsid.Manager)}, want: want{cond: certv1.CertificateDenied, message: "is not spiffe://tandem.dev/node/<node>"}},
		{name: "no SAN", uris: []string{}, want: want{cond: certv1.CertificateDenied, message: "0 URI SANs"}},
		{name: "weak RSA key", key: rsa1024, want: want{cond: certv1.CertificateDenied, message: "RSA of 1024 bits"}},
		{name: "P-224 key", key: ecKey(t, elliptic.P224()), want: want{cond: certv1.CertificateDenied, message: "P-224"}},
		{name: "code signing usage", edit: func(c *certv1.CertificateSigningRequest) {
			c.Spec.Usages = append(c.Spec.Usages, certv1.UsageCodeSigning)
		}, want: want{cond: certv1.CertificateDenied, message: `usage "code signing" is not allowed`}},
		{name: "other signer ignored", edit: func(c *certv1.CertificateSigningRequest) { c.Spec.SignerName = "example.com/other" }},
		{name: "already denied left alone", edit: func(c *certv1.CertificateSigningRequest) {
			c.Status.Conditions = []certv1.CertificateSigningRequestCondition{{Type: certv1.CertificateDenied, Status: corev1.ConditionTrue}}
		}, want: want{cond: certv1.CertificateDenied}},
		{name: "approved by someone else but another node's: Failed, not signed", edit: func(c *certv1.CertificateSigningRequest) {
			c.Spec.Extra[agentca.NodeNameExtra] = certv1.ExtraValue{"node-b"}
			c.Status.Conditions = []certv1.CertificateSigningRequestCondition{{Type: certv1.CertificateApproved, Status: corev1.ConditionTrue}}
		}, want: want{cond: certv1.CertificateFailed, message: "runs on node-b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := tc.key
			if key == nil {
				key = ecKey(t, elliptic.P256())
			}
			uris := tc.uris
			if uris == nil {
				uris = []string{nodeA}
			}
			csr := &certv1.CertificateSigningRequest{
				ObjectMeta: metav1.ObjectMeta{Name: "csr"},
				Spec: certv1.CertificateSigningRequestSpec{
					Request:    request(t, key, uris, tc.dns...),
					SignerName: agentca.SignerName,
					Usages:     []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageClientAuth, certv1.UsageServerAuth},
					Username:   agentSA,
					Extra:      map[string]certv1.ExtraValue{agentca.NodeNameExtra: {"node-a"}},
				},
			}
			if tc.edit != nil {
				tc.edit(csr)
			}
			objs := []client.Object{csr}
			if !tc.noNode {
				objs = append(objs, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
					{Type: corev1.NodeInternalIP, Address: "198.18.0.2"}, {Type: corev1.NodeHostName, Address: "node-a"},
					{Type: corev1.NodeHostName, Address: "node-a.example"}, {Type: corev1.NodeExternalIP, Address: "2001:db8::2"},
					{Type: corev1.NodeInternalIP, Address: "198.18.0.2"}, {Type: corev1.NodeInternalIP, Address: "not-an-ip"},
				}}})
			}
			c := newClient(objs...)
			ca, err := agentca.EnsureCA(ctx, c, ns, agentca.DefaultName, t0)
			if err != nil {
				t.Fatal(err)
			}
			s := &agentca.Signer{Client: c, CA: ca, Policy: agentca.Policy{Username: agentSA, MaxLifetime: 24 * time.Hour}, Clock: clocktesting.NewFakePassiveClock(t0)}
			if err := c.Get(ctx, client.ObjectKey{Name: "csr"}, csr); err != nil {
				t.Fatal(err)
			}
			if err := s.Decide(ctx, csr); err != nil {
				t.Fatalf("Decide: %v", err)
			}
			var got certv1.CertificateSigningRequest
			if err := c.Get(ctx, client.ObjectKey{Name: "csr"}, &got); err != nil {
				t.Fatal(err)
			}
			var cond *certv1.CertificateSigningRequestCondition
			for i := range got.Status.Conditions {
				cond = &got.Status.Conditions[i]
			}
			switch {
			case tc.want.cond == "" && cond != nil:
				t.Errorf("condition %s (%s), want none", cond.Type, cond.Message)
			case tc.want.cond != "" && (cond == nil || cond.Type != tc.want.cond):
				t.Errorf("conditions %+v, want last %s", got.Status.Conditions, tc.want.cond)
			case cond != nil && !strings.Contains(cond.Message, tc.want.message):
				t.Errorf("condition message %q, want it to contain %q", cond.Message, tc.want.message)
			}
			if !tc.want.signed {
				if len(got.Status.Certificate) > 0 {
					t.Error("signed")
				}
				return
			}
			block, _ := pem.Decode(got.Status.Certificate)
			if block == nil {
				t.Fatalf("no certificate: %q", got.Status.Certificate)
			}
			leaf, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			if id, err := tlsid.CertIdentity(leaf); err != nil || id != tlsid.NodeIdentity("node-a") {
				t.Errorf("identity %q, %v; want node-a's", id, err)
			}
			// The node's name and addresses, for NBD clients that check the
			// address they dialed.
			wantDNS, wantIPs := []string{"node-a", "node-a.example"}, []string{"198.18.0.2", "2001:db8::2"}
			if tc.noNode {
				wantDNS, wantIPs = []string{"node-a"}, nil
			}
			var ips []string
			for _, ip := range leaf.IPAddresses {
				ips = append(ips, ip.String())
			}
			if !slices.Equal(leaf.DNSNames, wantDNS) || !slices.Equal(ips, wantIPs) {
				t.Errorf("certificate names %v %v, want %v %v", leaf.DNSNames, ips, wantDNS, wantIPs)
			}
			if err := leaf.VerifyHostname("198.18.0.2"); !tc.noNode && err != nil {
				t.Errorf("VerifyHostname: %v", err)
			}
			if got := leaf.NotAfter.Sub(t0); got != tc.lifetime {
				t.Errorf("lifetime %v, want %v", got, tc.lifetime)
			}
			pool := x509.NewCertPool()
			pool.AddCert(ca.Cert)
			for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
				if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: t0, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
					t.Errorf("verify for usage %v: %v", u, err)
				}
			}
		})
	}
}

// The manager's in-memory certificate is renewed at two thirds of its
// lifetime, with a new key, and stays the manager's identity.
func TestManagerSourceRenews(t *testing.T) {
	ca, err := agentca.EnsureCA(context.Background(), newClient(), ns, agentca.DefaultName, t0)
	if err != nil {
		t.Fatal(err)
	}
	clk := clocktesting.NewFakeClock(t0)
	src, renew, err := ca.ManagerSource(30*time.Minute, clk)
	if err != nil {
		t.Fatal(err)
	}
	if src.Identity() != tlsid.Manager {
		t.Fatalf("identity %s", src.Identity())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); renew(ctx, logr.Discard()) }()
	first, firstNA := src.Serial(), src.NotAfter()
	firstCert, _ := src.ClientConfig(nil).GetClientCertificate(&tls.CertificateRequestInfo{})

	// Due at NotBefore + 2/3 of 35 min (5 min backdate): t0 + 18m20s.
	waitTimer(t, clk)
	clk.Step(18 * time.Minute)
	time.Sleep(20 * time.Millisecond)
	if src.Serial() != first {
		t.Fatal("renewed before two thirds of the lifetime")
	}
	clk.Step(30 * time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for src.Serial() == first && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if src.Serial() == first {
		t.Fatal("not renewed after two thirds of the lifetime")
	}
	if !src.NotAfter().After(firstNA) || src.Identity() != tlsid.Manager {
		t.Errorf("renewed: notAfter %v (was %v), identity %s", src.NotAfter(), firstNA, src.Identity())
	}
	c2, _ := src.ClientConfig(nil).GetClientCertificate(&tls.CertificateRequestInfo{})
	if c2.PrivateKey.(*ecdsa.PrivateKey).Equal(firstCert.PrivateKey) {
		t.Error("the renewed certificate has the old key")
	}
	cancel()
	<-done
}

func waitTimer(t *testing.T, clk *clocktesting.FakeClock) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !clk.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("no timer set")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestClientTLS: ClientTLS reads the CA Secret and presents a manager
// certificate of the lifetime asked, signed by that CA; a Secret missing or
// holding no CA is an error that says so.
func TestClientTLS(t *testing.T) {
	ctx := context.Background()
	c := newClient()
	ca, err := agentca.EnsureCA(ctx, c, ns, agentca.DefaultName, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := agentca.ClientTLS(ctx, c, ns, agentca.DefaultName, 15*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if id, err := tlsid.CertIdentity(leaf); err != nil || id != tlsid.Manager {
		t.Errorf("identity %q, %v; want %s", id, err, tlsid.Manager)
	}
	if err := leaf.CheckSignatureFrom(ca.Cert); err != nil {
		t.Errorf("not signed by the Secret's CA: %v", err)
	}
	if d := time.Until(leaf.NotAfter); d > 15*time.Minute || d < 14*time.Minute {
		t.Errorf("expires in %s, want 15m", d)
	}

	if _, err := agentca.ClientTLS(ctx, c, ns, "absent", time.Hour); err == nil || !strings.Contains(err.Error(), "get agent CA Secret tandem-system/absent") {
		t.Errorf("ClientTLS of a missing Secret: %v", err)
	}
	bad := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "bad"}, Data: map[string][]byte{"ca.crt": ca.PEM}}
	if err := c.Create(ctx, bad); err != nil {
		t.Fatal(err)
	}
	if _, err := agentca.ClientTLS(ctx, c, ns, "bad", time.Hour); err == nil || !strings.Contains(err.Error(), "agent CA Secret tandem-system/bad holds no usable CA") {
		t.Errorf("ClientTLS of a Secret without ca.key: %v", err)
	}
}
