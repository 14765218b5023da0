package nodecert_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crfake "sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/tandem-storage/tandem/internal/agentca"
	"github.com/tandem-storage/tandem/internal/nodecert"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

const (
	ns      = "tandem-system"
	agentSA = "system:serviceaccount:tandem-system:tandem-agent"
)

// signer plays the API server (it records the requester, here the agent of
// requesterNode) and the manager's signer on a fake clientset.
type signer struct {
	cs            *fake.Clientset
	ca            *agentca.CA
	clk           *clocktesting.FakeClock
	lifetime      time.Duration
	mu            sync.Mutex
	requesterNode string
	signed        []string
}

func (s *signer) run(ctx context.Context, t *testing.T) {
	p := agentca.Policy{Username: agentSA, MaxLifetime: s.lifetime}
	for ctx.Err() == nil {
		list, err := s.cs.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
		if err != nil {
			return
		}
		for _, csr := range list.Items {
			if len(csr.Status.Certificate) > 0 || len(csr.Status.Conditions) > 0 {
				continue
			}
			s.mu.Lock()
			csr.Spec.Username = agentSA
			csr.Spec.Extra = map[string]certv1.ExtraValue{agentca.NodeNameExtra: {s.requesterNode}}
			s.mu.Unlock()
			req, node, err := p.Check(&csr)
			if err != nil {
				csr.Status.Conditions = []certv1.CertificateSigningRequestCondition{{Type: certv1.CertificateDenied, Status: corev1.ConditionTrue, Reason: agentca.ReasonDenied, Message: err.Error()}}
			} else {
				csr.Status.Conditions = []certv1.CertificateSigningRequestCondition{{Type: certv1.CertificateApproved, Status: corev1.ConditionTrue}}
				s.mu.Lock()
				ca := s.ca
				s.mu.Unlock()
				if csr.Status.Certificate, err = ca.SignCSR(req, node, agentca.NodeAddresses{DNSNames: []string{node}}, csr.Spec.Usages, p.Lifetime(&csr), s.clk.Now()); err != nil {
					t.Error(err)
					return
				}
				s.mu.Lock()
				s.signed = append(s.signed, csr.Name)
				s.mu.Unlock()
			}
			if _, err := s.cs.CertificatesV1().CertificateSigningRequests().UpdateStatus(ctx, &csr, metav1.UpdateOptions{}); err != nil {
				t.Error(err)
				return
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func setup(t *testing.T, requesterNode string) (*nodecert.Issuer, *signer, context.Context) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	crc := crfake.NewClientBuilder().Build()
	clk := clocktesting.NewFakeClock(time.Now())
	ca, err := agentca.EnsureCA(ctx, crc, ns, agentca.DefaultName, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	if err := crc.Get(ctx, client.ObjectKey{Namespace: ns, Name: agentca.DefaultName}, &cm); err != nil {
		t.Fatal(err)
	}
	cs := fake.NewClientset(&cm)
	s := &signer{cs: cs, ca: ca, clk: clk, lifetime: 30 * time.Minute, requesterNode: requesterNode}
	var wg sync.WaitGroup
	wg.Go(func() { s.run(ctx, t) })
	t.Cleanup(wg.Wait)
	t.Cleanup(cancel)
	iss := &nodecert.Issuer{Client: cs, Node: "node-a", Namespace: ns, Dir: filepath.Join(t.TempDir(), "tls"), Clock: clk,
		Log: zap.New(zap.UseDevMode(true), zap.WriteTo(testWriter{t})), PollEvery: 5 * time.Millisecond, Wait: 10 * time.Second, CheckEvery: time.Hour}
	return iss, s, ctx
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func TestIssueWritesFiles(t *testing.T) {
	iss, s, ctx := setup(t, "node-a")
	if err := iss.Ensure(ctx); err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	src, err := tlsid.Load(iss.Dir, tlsid.WithIdentity(tlsid.NodeIdentity("node-a")))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got := src.NotAfter().Sub(src.NotBefore()); got != 35*time.Minute {
		t.Errorf("lifetime %v, want 35m (30m + 5m backdate)", got)
	}
	st, err := os.Stat(filepath.Join(iss.Dir, tlsid.KeyFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("tls.key: %v, mode %v; want 0600", err, st.Mode())
	}
	ca, _ := os.ReadFile(filepath.Join(iss.Dir, tlsid.CAFile))
	if string(ca) != string(s.ca.PEM) {
		t.Error("ca.crt is not the ConfigMap's CA")
	}
	// The CSR: signer, URI SAN, usages, the name from the key.
	list, _ := s.cs.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
	if len(list.Items) != 1 {
		t.Fatalf("%d CSRs, want 1", len(list.Items))
	}
	csr := list.Items[0]
	blk, _ := pem.Decode(csr.Spec.Request)
	req, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(req.PublicKey)
	if csr.Name != nodecert.CSRName("node-a", pub) || csr.Spec.SignerName != agentca.SignerName || len(req.URIs) != 1 || req.URIs[0].String() != string(tlsid.NodeIdentity("node-a")) {
		t.Errorf("CSR %s signer %s URIs %v", csr.Name, csr.Spec.SignerName, req.URIs)
	}
	// A restart with a usable certificate asks for nothing.
	if err := iss.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if list, _ := s.cs.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{}); len(list.Items) != 1 {
		t.Errorf("a second Ensure made %d CSRs, want none more", len(list.Items)-1)
	}
}

func TestIssueDenied(t *testing.T) {
	iss, _, ctx := setup(t, "node-b")
	err := iss.Issue(ctx)
	if err == nil || !strings.Contains(err.Error(), "Denied") || !strings.Contains(err.Error(), "the requesting Pod runs on node-b but the CSR asks for node-a") {
		t.Fatalf("Issue: %v, want the Denied condition's message", err)
	}
	if _, err := os.Stat(filepath.Join(iss.Dir, tlsid.CertFile)); err == nil {
		t.Error("tls.crt written although denied")
	}
}

// Run renews at two thirds of the lifetime (new key, new serial) while the
// Source keeps serving, and when renew-now is there.
func TestRenewal(t *testing.T) {
	iss, s, ctx := setup(t, "node-a")
	if err := iss.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	src, err := tlsid.Load(iss.Dir, tlsid.WithIdentity(tlsid.NodeIdentity("node-a")))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); iss.Run(runCtx, src) }()
	defer func() { stop(); <-done }()
	clk := s.clk
	first := src.Serial()
	due := nodecert.Due(src.NotBefore(), src.NotAfter())

	waitFor(t, "Run's timer", clk.HasWaiters)
	clk.SetTime(due.Add(-time.Second))
	waitFor(t, "Run's timer again", clk.HasWaiters)
	if src.Serial() != first {
		t.Fatal("renewed before two thirds of the lifetime")
	}
	clk.SetTime(due)
	waitFor(t, "the renewal", func() bool { return src.Serial() != first })
	second := src.Serial()
	if n := signedCount(s); n != 2 {
		t.Errorf("%d certificates signed, want 2", n)
	}

	// renew-now: at the next check.
	if err := os.WriteFile(filepath.Join(iss.Dir, nodecert.RenewNowFile), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "Run's timer", clk.HasWaiters)
	clk.Step(iss.CheckEvery)
	waitFor(t, "the asked-for renewal", func() bool { return src.Serial() != second })
	waitFor(t, "renew-now removed", func() bool {
		_, err := os.Stat(filepath.Join(iss.Dir, nodecert.RenewNowFile))
		return os.IsNotExist(err)
	})
}

func signedCount(s *signer) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.signed)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// A renewal that fails (here: denied) leaves the current certificate
// serving and is retried with backoff; a changed CA bundle in the
// ConfigMap makes Run renew and write the new bundle.
func TestRenewalRetriesAndFollowsCA(t *testing.T) {
	iss, s, ctx := setup(t, "node-a")
	if err := iss.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	src, err := tlsid.Load(iss.Dir, tlsid.WithIdentity(tlsid.NodeIdentity("node-a")))
	if err != nil {
		t.Fatal(err)
	}
	iss.CheckEvery = time.Minute // well before the next renewal is due
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); iss.Run(runCtx, src) }()
	defer func() { stop(); <-done }()
	clk := s.clk
	first := src.Serial()

	s.mu.Lock()
	s.requesterNode = "node-b" // every CSR is denied from now on
	s.mu.Unlock()
	waitFor(t, "Run's timer", clk.HasWaiters)
	clk.SetTime(nodecert.Due(src.NotBefore(), src.NotAfter()))
	waitFor(t, "a denied renewal", func() bool {
		list, _ := s.cs.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
		for _, c := range list.Items {
			if len(c.Status.Conditions) > 0 && c.Status.Conditions[0].Type == certv1.CertificateDenied {
				return true
			}
		}
		return false
	})
	waitFor(t, "the backoff timer", clk.HasWaiters)
	if src.Serial() != first {
		t.Fatal("the certificate changed although the renewal was denied")
	}
	s.mu.Lock()
	s.requesterNode = "node-a"
	s.mu.Unlock()
	clk.Step(10 * time.Second) // the first backoff
	waitFor(t, "the retried renewal", func() bool { return src.Serial() != first })
	second := src.Serial()

	// A new CA in the ConfigMap (and the signer using it).
	crc := crfake.NewClientBuilder().Build()
	newCA, err := agentca.EnsureCA(ctx, crc, ns, agentca.DefaultName, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.ca = newCA
	s.mu.Unlock()
	cm, err := s.cs.CoreV1().ConfigMaps(ns).Get(ctx, agentca.DefaultName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data[agentca.KeyCACert] = string(newCA.PEM)
	if _, err := s.cs.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "Run's timer", clk.HasWaiters)
	clk.Step(iss.CheckEvery)
	waitFor(t, "the renewal for the new CA", func() bool { return src.Serial() != second })
	if got, _ := os.ReadFile(filepath.Join(iss.Dir, tlsid.CAFile)); string(got) != string(newCA.PEM) {
		t.Error("ca.crt is not the new bundle")
	}
}
