package tlsid_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
)

// result is what one handshake between a server and a client config gave.
type result struct {
	serverErr, clientErr error
	server, client       tls.ConnectionState
}

func handshake(t *testing.T, server, client *tls.Config) result {
	t.Helper()
	sc, cc := net.Pipe()
	defer sc.Close()
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, c := tls.Server(sc, server), tls.Client(cc, client)
	var r result
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.serverErr = s.HandshakeContext(ctx)
		if r.serverErr != nil {
			sc.Close()
		}
	}()
	r.clientErr = c.HandshakeContext(ctx)
	if r.clientErr != nil {
		cc.Close()
	} else {
		// TLS 1.3: the client is done before the server has checked its
		// certificate; a read sees the server's verdict.
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
			r.clientErr = err
		}
	}
	<-done
	r.server, r.client = s.ConnectionState(), c.ConnectionState()
	return r
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestIdentity(t *testing.T) {
	for _, tc := range []struct {
		id      tlsid.Identity
		node    string
		isNode  bool
		invalid bool
	}{
		{id: tlsid.NodeIdentity("node-a"), node: "node-a", isNode: true},
		{id: "spiffe://tandem.dev/node/ip-10-0-0-1.ec2.internal", node: "ip-10-0-0-1.ec2.internal", isNode: true},
		{id: tlsid.Manager},
		{id: "spiffe://tandem.dev/node/", invalid: true},
		{id: "spiffe://tandem.dev/node/Node-A", node: "Node-A", isNode: true, invalid: true},
		{id: "spiffe://tandem.dev/node/a/b", node: "a/b", isNode: true, invalid: true},
		{id: "spiffe://tandem.dev/node/-a", node: "-a", isNode: true, invalid: true},
		{id: "spiffe://other.dev/node/node-a", invalid: true},
		{id: "spiffe://tandem.dev/admin", invalid: true},
	} {
		node, ok := tc.id.Node()
		if node != tc.node || ok != tc.isNode {
			t.Errorf("%s.Node() = %q, %v; want %q, %v", tc.id, node, ok, tc.node, tc.isNode)
		}
		if err := tc.id.Valid(); (err != nil) != tc.invalid {
			t.Errorf("%s.Valid() = %v; want invalid %v", tc.id, err, tc.invalid)
		}
	}
}

func TestCertIdentity(t *testing.T) {
	ca := tlsidtest.NewCA(t, "ca")
	parse := func(id tlsid.Identity, edit ...func(*x509.Certificate)) *x509.Certificate {
		c, _ := ca.Issue(t, id, edit...)
		blk, _ := pem.Decode(c)
		x, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	addURI := func(s string) func(*x509.Certificate) {
		return func(c *x509.Certificate) {
			u, _ := url.Parse(s)
			c.URIs = append(c.URIs, u)
		}
	}
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
		want tlsid.Identity
		err  string
	}{
		{name: "node", cert: parse(tlsid.NodeIdentity("node-a")), want: tlsid.NodeIdentity("node-a")},
		{name: "manager", cert: parse(tlsid.Manager), want: tlsid.Manager},
		{name: "foreign URIs are ignored", cert: parse(tlsid.Manager, addURI("spiffe://cluster.local/ns/x/sa/y"), addURI("https://example.com")), want: tlsid.Manager},
		{name: "none", cert: parse(""), err: "names no identity"},
		{name: "two", cert: parse(tlsid.NodeIdentity("node-a"), addURI("spiffe://tandem.dev/node/node-b")), err: "names 2 identities"},
		{name: "invalid", cert: parse("spiffe://tandem.dev/node/NODE"), err: "not a valid node name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tlsid.CertIdentity(tc.cert)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("CertIdentity = %q, %v; want error %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("CertIdentity = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestHandshakeIdentities(t *testing.T) {
	ca := tlsidtest.NewCA(t, "ca")
	a := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-a")), tlsid.WithIdentity(tlsid.NodeIdentity("node-a")))
	b := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-b")))
	var seen tlsid.Identity
	r := handshake(t, a.ServerConfig(true), b.ClientConfig(func(id tlsid.Identity) error { seen = id; return nil }))
	if r.serverErr != nil || r.clientErr != nil {
		t.Fatalf("handshake: server %v, client %v", r.serverErr, r.clientErr)
	}
	if seen != tlsid.NodeIdentity("node-a") {
		t.Errorf("client saw server identity %q, want node-a's", seen)
	}
	if got, err := tlsid.PeerIdentity(r.server); err != nil || got != tlsid.NodeIdentity("node-b") {
		t.Errorf("PeerIdentity on the server = %q, %v; want node-b's", got, err)
	}
	// The client side's verification is its own (no VerifiedChains): it
	// names no peer identity, rather than an unverified one.
	if got, err := tlsid.PeerIdentity(r.client); err == nil {
		t.Errorf("PeerIdentity on the client = %q, want an error", got)
	}
	// The check refuses a server that is not the expected one.
	r = handshake(t, a.ServerConfig(true), b.ClientConfig(func(id tlsid.Identity) error {
		if id != tlsid.NodeIdentity("node-c") {
			return &net.AddrError{Err: "not node-c", Addr: string(id)}
		}
		return nil
	}))
	if r.clientErr == nil || !strings.Contains(r.clientErr.Error(), "not node-c") {
		t.Errorf("client expecting node-c: %v, want refused", r.clientErr)
	}
}

func TestHandshakeRefusals(t *testing.T) {
	ca, other := tlsidtest.NewCA(t, "ca"), tlsidtest.NewCA(t, "other")
	server := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-a")))
	foreign := tlsidtest.Load(t, other.Dir(t, tlsid.NodeIdentity("node-b"), ca))     // trusts ca, its cert is other's
	trustsOther := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-b"), other)) // its cert is ca's, trusts other only
	// A CA-signed certificate without an identity cannot be loaded by a
	// Source; present one with a raw config.
	c, k := ca.Issue(t, "")
	anon, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		server  *tls.Config
		client  *tls.Config
		refused string // which side fails: "server" or "client"
	}{
		{name: "client certificate from another CA", server: server.ServerConfig(true), client: foreign.ClientConfig(nil), refused: "server"},
		{name: "server certificate from another CA", server: server.ServerConfig(true), client: trustsOther.ClientConfig(nil), refused: "client"},
		{name: "no client certificate", server: server.ServerConfig(true), client: &tls.Config{InsecureSkipVerify: true}, refused: "server"},
		{name: "client certificate without identity", server: server.ServerConfig(false), client: &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{anon}}, refused: "server"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := handshake(t, tc.server, tc.client)
			switch tc.refused {
			case "server":
				if r.serverErr == nil {
					t.Errorf("server accepted (peer %v)", r.server.PeerCertificates)
				}
			case "client":
				if r.clientErr == nil {
					t.Errorf("client accepted")
				}
			}
		})
	}
	// Without a required client certificate a client without one is let
	// through, and has no identity.
	r := handshake(t, server.ServerConfig(false), &tls.Config{InsecureSkipVerify: true})
	if r.serverErr != nil {
		t.Fatalf("optional client certificate: %v", r.serverErr)
	}
	if id, err := tlsid.PeerIdentity(r.server); err == nil {
		t.Errorf("PeerIdentity without a client certificate = %q, want an error", id)
	}
}

// TestReloadOnFileChange: Watch picks up new files, and the next handshake
// presents the new certificate, without a new Source or config.
func TestReloadOnFileChange(t *testing.T) {
	ca := tlsidtest.NewCA(t, "ca")
	dir := ca.Dir(t, tlsid.NodeIdentity("node-a"))
	clk := clocktesting.NewFakeClock(time.Now())
	a := tlsidtest.Load(t, dir, tlsid.WithClock(clk))
	b := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-b")))
	serverCfg, clientCfg := a.ServerConfig(true), b.ClientConfig(nil)
	serial := func() string {
		r := handshake(t, serverCfg, clientCfg)
		if r.serverErr != nil || r.clientErr != nil {
			t.Fatalf("handshake: server %v, client %v", r.serverErr, r.clientErr)
		}
		return r.client.PeerCertificates[0].SerialNumber.String()
	}
	first := serial()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go a.Watch(ctx, tlsid.ReloadEvery, logr.Discard())

	ca.WriteDir(t, dir, tlsid.NodeIdentity("node-a"))
	if got := serial(); got != first {
		t.Fatalf("the new certificate was used before a reload (%s)", got)
	}
	deadline := time.Now().Add(10 * time.Second)
	for serial() == first {
		if time.Now().After(deadline) {
			t.Fatal("the handshake still presents the old certificate")
		}
		clk.Step(tlsid.ReloadEvery) // the ticker may not be waiting yet: step until it fires
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCARotation: a bundle of the old and the new CA accepts certificates
// of both; once the old one is dropped, only the new CA's.
func TestCARotation(t *testing.T) {
	oldCA, newCA := tlsidtest.NewCA(t, "old"), tlsidtest.NewCA(t, "new")
	dir := oldCA.Dir(t, tlsid.NodeIdentity("node-a"), oldCA, newCA)
	server := tlsidtest.Load(t, dir)
	fromOld := tlsidtest.Load(t, oldCA.Dir(t, tlsid.NodeIdentity("node-b"), oldCA, newCA))
	fromNew := tlsidtest.Load(t, newCA.Dir(t, tlsid.NodeIdentity("node-c"), oldCA, newCA))
	cfg := server.ServerConfig(true)
	for name, c := range map[string]*tlsid.Source{"old": fromOld, "new": fromNew} {
		if r := handshake(t, cfg, c.ClientConfig(nil)); r.serverErr != nil || r.clientErr != nil {
			t.Errorf("client of the %s CA during the rotation: server %v, client %v", name, r.serverErr, r.clientErr)
		}
	}
	newCA.WriteDir(t, dir, tlsid.NodeIdentity("node-a"), newCA)
	if changed, err := server.Reload(); !changed || err != nil {
		t.Fatalf("Reload = %v, %v", changed, err)
	}
	if r := handshake(t, cfg, fromOld.ClientConfig(nil)); r.serverErr == nil {
		t.Error("a client of the dropped CA was accepted")
	}
	if r := handshake(t, cfg, fromNew.ClientConfig(nil)); r.serverErr != nil || r.clientErr != nil {
		t.Errorf("client of the new CA: server %v, client %v", r.serverErr, r.clientErr)
	}
}

// TestReloadKeepsGoodMaterial: files that do not load leave the material
// loaded before in use.
func TestReloadKeepsGoodMaterial(t *testing.T) {
	ca := tlsidtest.NewCA(t, "ca")
	dir := ca.Dir(t, tlsid.NodeIdentity("node-a"))
	s := tlsidtest.Load(t, dir, tlsid.WithIdentity(tlsid.NodeIdentity("node-a")))
	notAfter := s.NotAfter()
	c1, _ := ca.Issue(t, tlsid.NodeIdentity("node-a"))
	_, k2 := ca.Issue(t, tlsid.NodeIdentity("node-a"))
	cb, kb := ca.Issue(t, tlsid.NodeIdentity("node-b"))
	c3, k3 := ca.Issue(t, tlsid.NodeIdentity("node-a"))
	for _, tc := range []struct {
		name         string
		cert, key, b []byte
		err          string
	}{
		{name: "key of another certificate", cert: c1, key: k2, b: ca.PEM, err: "private key does not match"},
		{name: "another identity", cert: cb, key: kb, b: ca.PEM, err: "want spiffe://tandem.dev/node/node-a"},
		{name: "empty CA bundle", cert: c3, key: k3, b: []byte("\n"), err: "holds no certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tlsidtest.WriteFiles(t, dir, tc.cert, tc.key, tc.b)
			changed, err := s.Reload()
			if changed || err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Reload = %v, %v; want error %q", changed, err, tc.err)
			}
			if s.Identity() != tlsid.NodeIdentity("node-a") || !s.NotAfter().Equal(notAfter) {
				t.Errorf("material changed to %s until %v", s.Identity(), s.NotAfter())
			}
		})
	}
	if err := os.Remove(filepath.Join(dir, tlsid.KeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reload(); err == nil {
		t.Error("Reload without tls.key succeeded")
	}
	// Without WithIdentity a reload still never changes identity.
	dir2 := ca.Dir(t, tlsid.NodeIdentity("node-a"))
	s2 := tlsidtest.Load(t, dir2)
	ca.WriteDir(t, dir2, tlsid.NodeIdentity("node-b"))
	if _, err := s2.Reload(); err == nil || s2.Identity() != tlsid.NodeIdentity("node-a") {
		t.Errorf("a reload to another identity: %v, identity %s", err, s2.Identity())
	}
	if _, err := tlsid.Load(dir2, tlsid.WithIdentity(tlsid.NodeIdentity("node-a"))); err == nil {
		t.Error("Load of node-b's certificate as node-a succeeded")
	}
}

// BenchmarkLoopbackStream measures what TLS costs a replication-like
// stream: 1 MiB writes over loopback TCP, plain and through configs of
// this package (TLS 1.3, ECDSA P-256 certificates; AES-GCM with the CPU's
// instructions when it has them). The figure is throughput on one core
// pair; see docs/security.md for what was measured.
func BenchmarkLoopbackStream(b *testing.B) {
	ca := tlsidtest.NewCA(b, "ca")
	server := tlsidtest.Load(b, ca.Dir(b, tlsid.NodeIdentity("node-b")))
	client := tlsidtest.Load(b, ca.Dir(b, tlsid.NodeIdentity("node-a")))
	for _, tc := range []struct {
		name           string
		server, client *tls.Config
	}{
		{name: "plain"},
		{name: "tls", server: server.ServerConfig(true), client: client.ClientConfig(nil)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				if tc.server != nil {
					c = tls.Server(c, tc.server)
				}
				buf := make([]byte, 256<<10)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			if tc.client != nil {
				tc := tls.Client(c, tc.client)
				if err := tc.Handshake(); err != nil {
					b.Fatal(err)
				}
				c = tc
			}
			chunk := make([]byte, 1<<20)
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// An in-memory Source (FromPEM, Set) serves handshakes like a directory's,
// takes a renewed certificate at once, and refuses material of another
// identity, keeping what it had.
func TestInMemorySource(t *testing.T) {
	ca := tlsidtest.NewCA(t, "ca")
	cert, key := ca.Issue(t, tlsid.Manager)
	m, err := tlsid.FromPEM(cert, key, tlsidtest.Bundle(ca), tlsid.WithIdentity(tlsid.Manager))
	if err != nil {
		t.Fatalf("FromPEM: %v", err)
	}
	node := tlsidtest.Load(t, ca.Dir(t, tlsid.NodeIdentity("node-a")))
	r := handshake(t, node.ServerConfig(true), m.ClientConfig(nil))
	if r.serverErr != nil || r.clientErr != nil {
		t.Fatalf("handshake: server %v, client %v", r.serverErr, r.clientErr)
	}
	if got, err := tlsid.PeerIdentity(r.server); err != nil || got != tlsid.Manager {
		t.Errorf("PeerIdentity = %q, %v; want the manager", got, err)
	}
	first := m.Serial()

	cert2, key2 := ca.Issue(t, tlsid.Manager)
	if err := m.Set(cert2, key2, tlsidtest.Bundle(ca)); err != nil {
		t.Fatalf("Set: %v", err)
	}
	if m.Serial() == first {
		t.Errorf("Serial still %s after Set", first)
	}
	r = handshake(t, node.ServerConfig(true), m.ClientConfig(nil))
	if r.serverErr != nil {
		t.Fatalf("handshake after Set: %v", r.serverErr)
	}
	if got := r.server.PeerCertificates[0].SerialNumber.Text(16); got != m.Serial() {
		t.Errorf("the server saw serial %s, want the renewed %s", got, m.Serial())
	}

	other, otherKey := ca.Issue(t, tlsid.NodeIdentity("node-b"))
	if err := m.Set(other, otherKey, tlsidtest.Bundle(ca)); err == nil {
		t.Error("Set with a node's certificate on the manager's Source succeeded")
	}
	if err := m.Set(cert2, key, tlsidtest.Bundle(ca)); err == nil {
		t.Error("Set with a key that does not match succeeded")
	}
	if changed, err := m.Reload(); changed || err != nil {
		t.Errorf("Reload of an in-memory Source = %v, %v; want false, nil", changed, err)
	}
	if m.Identity() != tlsid.Manager || m.Serial() == first {
		t.Errorf("after refused Sets: identity %s serial %s, want the renewed manager certificate", m.Identity(), m.Serial())
	}
}
