package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/nbd/nbdtest"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
)

// tlsPKI is a CA with a server certificate (the agent of node-a, with the
// address 127.0.0.1 for clients that check it) and client sources.
type tlsPKI struct {
	ca     *tlsidtest.CA
	server *tlsid.Source
}

func newTLSPKI(t *testing.T) *tlsPKI {
	ca := tlsidtest.NewCA(t, "tandem-ca")
	cert, key := ca.Issue(t, tlsid.NodeIdentity("node-a"), func(c *x509.Certificate) {
		c.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	})
	src, err := tlsid.FromPEM(cert, key, ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	return &tlsPKI{ca: ca, server: src}
}

// client returns the TLS config of a client holding a certificate of ca
// naming id.
func tlsClient(t *testing.T, ca *tlsidtest.CA, id tlsid.Identity, trust []byte) *tls.Config {
	cert, key := ca.Issue(t, id)
	if id == "" {
		// tlsid refuses to load such a certificate; present it anyway.
		kp, err := tls.X509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{kp}, InsecureSkipVerify: true}
	}
	src, err := tlsid.FromPEM(cert, key, trust)
	if err != nil {
		t.Fatal(err)
	}
	return src.ClientConfig(nil)
}

func dialTLSOpts(t *testing.T, addr string, opts ...ClientOption) (*Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := Dial(ctx, addr, testExport, opts...)
	if err == nil {
		t.Cleanup(func() { _ = c.Close() })
	}
	return c, err
}

func roundTrip(t *testing.T, c *Client, seed byte) {
	t.Helper()
	ctx := context.Background()
	p := pattern(64<<10, seed)
	if err := c.WriteAt(ctx, p, 4096, true); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(ctx, got, 4096); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	assertBytes(t, "read back over TLS", got, p)
}

func TestStartTLS(t *testing.T) {
	pki := newTLSPKI(t)
	other := tlsidtest.NewCA(t, "other-ca")
	nodeB := tlsClient(t, pki.ca, tlsid.NodeIdentity("node-b"), pki.ca.PEM)
	anonymous := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}
	tests := []struct {
		name    string
		tls     bool // the server offers TLS
		require bool
		client  *tls.Config
		// want is "" for a working connection, else a part of the error.
		// (In TLS 1.3 the server checks the client's certificate after the
		// client's side of the handshake is done: the client learns of a
		// refusal on its next read.)
		want string
		// tlsConns, tlsFailures: the server's counters afterwards.
		tlsConns, tlsFailures uint64
	}{
		{name: "node certificate, TLS offered", tls: true, client: nodeB, tlsConns: 1},
		{name: "node certificate, TLS required", tls: true, require: true, client: nodeB, tlsConns: 1},
		{name: "manager certificate", tls: true, require: true, client: tlsClient(t, pki.ca, tlsid.Manager, pki.ca.PEM), tlsConns: 1},
		{name: "plain client, TLS offered", tls: true},
		{name: "plain client, TLS required", tls: true, require: true, want: "NBD_REP_ERR_TLS_REQD): this server requires TLS"},
		{name: "TLS client, server without TLS", client: nodeB, want: "NBD_OPT_STARTTLS refused (NBD_REP_ERR_UNSUP)"},
		{name: "certificate of another CA", tls: true, require: true, client: tlsClient(t, other, tlsid.NodeIdentity("node-b"), pki.ca.PEM), want: "tls: unknown certificate authority", tlsFailures: 1},
		{name: "no client certificate", tls: true, require: true, client: anonymous, want: "tls: certificate required", tlsFailures: 1},
		{name: "certificate without an identity", tls: true, require: true, client: tlsClient(t, pki.ca, "", pki.ca.PEM), want: "tls: bad certificate", tlsFailures: 1},
		{name: "server of another CA", tls: true, require: true, client: tlsClient(t, pki.ca, tlsid.NodeIdentity("node-b"), other.PEM), want: "TLS handshake after NBD_OPT_STARTTLS", tlsFailures: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) {
				if tc.tls {
					s.TLS = pki.server.ServerConfig(true)
				}
				s.RequireTLS = tc.require
			})
			var opts []ClientOption
			if tc.client != nil {
				opts = append(opts, WithTLS(tc.client))
			}
			c, err := dialTLSOpts(t, env.addr, opts...)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Dial: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Dial: %v, want an error with %q", err, tc.want)
			case tc.want == "":
				roundTrip(t, c, 3)
				if tc.client != nil {
					if _, ok := c.conn.(*tls.Conn); !ok {
						t.Fatalf("the client's connection is a %T, not TLS", c.conn)
					}
				}
			}
			if tc.want != "" && tc.tlsFailures == 0 {
				var oe *OptionError
				if !errors.As(err, &oe) {
					t.Fatalf("Dial: %v is not an *OptionError", err)
				}
			}
			if tc.tlsFailures > 0 {
				env.logs.waitFor(t, "TLS handshake after NBD_OPT_STARTTLS")
			}
			st := env.srv.Stats()
			if st.TLSConns != tc.tlsConns || st.TLSFailures != tc.tlsFailures {
				t.Fatalf("TLSConns %d TLSFailures %d, want %d and %d", st.TLSConns, st.TLSFailures, tc.tlsConns, tc.tlsFailures)
			}
		})
	}
}

// The protocol's corner cases, driven on the wire.
func TestStartTLSProtocol(t *testing.T) {
	pki := newTLSPKI(t)
	clientCfg := tlsClient(t, pki.ca, tlsid.NodeIdentity("node-b"), pki.ca.PEM)
	upgrade := func(t *testing.T, c *testClient) {
		t.Helper()
		c.option(optStartTLS, nil)
		if r := c.mustOptReply(); r.opt != optStartTLS || r.typ != repAck || len(r.data) != 0 {
			t.Fatalf("NBD_OPT_STARTTLS: reply %+v", r)
		}
		tc := tls.Client(c.c, clientCfg)
		if err := tc.Handshake(); err != nil {
			t.Fatalf("TLS handshake: %v", err)
		}
		c.c, c.br = tc, bufio.NewReader(tc)
	}
	tests := []struct {
		name    string
		require bool
		run     func(t *testing.T, env *testEnv, c *testClient)
	}{
		{
			name: "STARTTLS with data is invalid, the connection stays",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.option(optStartTLS, []byte("x"))
				if r := c.mustOptReply(); r.typ != repErrInvalid {
					t.Fatalf("reply 0x%x %q", r.typ, r.data)
				}
				upgrade(t, c)
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name: "STARTTLS twice",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				upgrade(t, c)
				c.option(optStartTLS, nil)
				if r := c.mustOptReply(); r.typ != repErrInvalid || !strings.Contains(string(r.data), "already") {
					t.Fatalf("reply 0x%x %q", r.typ, r.data)
				}
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name:    "required: LIST and INFO refused before TLS, served after",
			require: true,
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.option(optList, nil)
				if r := c.mustOptReply(); r.typ != repErrTLSReqd {
					t.Fatalf("NBD_OPT_LIST: reply 0x%x %q", r.typ, r.data)
				}
				if _, final := c.infoReplies(optInfo, testExport); final.typ != repErrTLSReqd {
					t.Fatalf("NBD_OPT_INFO: reply 0x%x %q", final.typ, final.data)
				}
				upgrade(t, c)
				c.option(optList, nil)
				if r := c.mustOptReply(); r.typ != repServer {
					t.Fatalf("NBD_OPT_LIST inside TLS: reply 0x%x %q", r.typ, r.data)
				}
				c.mustOptReply() // the ACK
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name:    "required: EXPORT_NAME before TLS closes",
			require: true,
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.option(optExportName, []byte(testExport))
				if rest := c.expectClosed(); len(rest) != 0 {
					t.Fatalf("got %d bytes before close", len(rest))
				}
				env.logs.waitFor(t, "refusing NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS")
			},
		},
		{
			name:    "required: ABORT before TLS",
			require: true,
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.option(optAbort, nil)
				if r := c.mustOptReply(); r.typ != repAck {
					t.Fatalf("reply 0x%x", r.typ)
				}
				c.expectClosed()
			},
		},
		{
			name: "bytes after STARTTLS before its reply close",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.write(append(encodeOption(optStartTLS, nil), encodeOption(optList, nil)...))
				if rest := c.expectClosed(); len(rest) != 0 {
					t.Fatalf("got %d bytes before close", len(rest))
				}
				env.logs.waitFor(t, "bytes sent after NBD_OPT_STARTTLS before its reply")
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) {
				s.TLS = pki.server.ServerConfig(true)
				s.RequireTLS = tc.require
			})
			c := dial(t, env.addr)
			c.greeting()
			c.clientFlags(clientFixedNewstyle | clientNoZeroes)
			tc.run(t, env, c)
		})
	}
}

// Negotiate hands back the TLS connection, ready for transmission.
func TestNegotiateTLS(t *testing.T) {
	pki := newTLSPKI(t)
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) {
		s.TLS = pki.server.ServerConfig(true)
		s.RequireTLS = true
	})
	nc, err := net.Dial("tcp", env.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	info, conn, err := Negotiate(ctx, nc, testExport, WithTLS(tlsClient(t, pki.ca, tlsid.NodeIdentity("node-b"), pki.ca.PEM)))
	if err != nil {
		t.Fatalf("Negotiate: %v", err)
	}
	if _, ok := conn.(*tls.Conn); !ok || info.Size != 1<<20 {
		t.Fatalf("Negotiate: %T, size %d", conn, info.Size)
	}
	c := &testClient{t: t, c: conn, br: bufio.NewReader(conn), size: uint64(info.Size), flags: info.Flags, readLens: map[uint64]uint32{}}
	assertTransmission(t, c)
}

// Real clients (GnuTLS under libnbd and qemu) negotiate TLS with the
// server: nbdinfo and nbdcopy through an nbds:// URI, qemu-io through
// tls-creds-x509. They check the server's certificate against the address
// they dialed, which is why the test's server certificate carries
// 127.0.0.1.
func TestInteropTLS(t *testing.T) {
	pki := newTLSPKI(t)
	env := startServer(t, 16<<20, func(s *Server, _ *StaticExports) {
		s.TLS = pki.server.ServerConfig(true)
		s.RequireTLS = true
	})
	// The layout GnuTLS clients read: ca-cert.pem, client-cert.pem,
	// client-key.pem.
	dir := t.TempDir()
	cert, key := pki.ca.Issue(t, tlsid.NodeIdentity("node-b"))
	for name, b := range map[string][]byte{"ca-cert.pem": pki.ca.PEM, "client-cert.pem": cert, "client-key.pem": key} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	uri := "nbds://" + env.addr + "/" + testExport + "?tls-certificates=" + dir

	out := runClient(t, true, "nbdinfo", "--json", uri)
	if !strings.Contains(out, `"export-size": 16777216`) {
		t.Fatalf("nbdinfo over TLS:\n%s", out)
	}
	// Plain text is refused with the server's reason.
	out = runClientEnv(t, []string{"LIBNBD_DEBUG=1"}, false, "nbdinfo", env.uri(testExport))
	if !strings.Contains(out, "this server requires TLS") {
		t.Fatalf("plain nbdinfo against a TLS-only server:\n%s", out)
	}

	src := filepath.Join(t.TempDir(), "src.img")
	data := pattern(16<<20, 7)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	runClient(t, true, "nbdcopy", src, uri)
	if !bytes.Equal(env.mem.Bytes(), data) {
		t.Fatal("nbdcopy over TLS: the export differs from the file copied")
	}

	{
		nbdtest.Require(t, "qemu-io")
		out = runClient(t, true, "qemu-io", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+dir,
			"--image-opts", "driver=nbd,host=127.0.0.1,port="+env.addr[strings.LastIndexByte(env.addr, ':')+1:]+",export="+testExport+",tls-creds=tls0",
			"-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k")
		if !strings.Contains(out, "read 65536/65536 bytes") {
			t.Fatalf("qemu-io over TLS:\n%s", out)
		}
	}
	if st := env.srv.Stats(); st.TLSConns < 2 {
		t.Fatalf("TLSConns %d", st.TLSConns)
	}
}
