package agent_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/dataplane/nbd/nbdtest"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/internal/tlsid"
	"github.com/tandem-storage/tandem/internal/tlsid/tlsidtest"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

const tlsToken = "tls-token"

// tlsEnv is a CA, the manager's TLS material and client, and agents with
// mutual TLS.
type tlsEnv struct {
	t       *testing.T
	ca      *tlsidtest.CA
	manager *tlsid.Source
	srcs    map[string]*tlsid.Source // each agent's, by node
}

func newTLSEnv(t *testing.T) *tlsEnv {
	ca := tlsidtest.NewCA(t, "tandem-ca")
	return &tlsEnv{t: t, ca: ca, manager: tlsidtest.Load(t, ca.Dir(t, tlsid.Manager)), srcs: map[string]*tlsid.Source{}}
}

// client is a control API client of endpoint presenting src's certificate
// (nil: none) and checking the agent's (any node identity of the CA).
func (e *tlsEnv) client(endpoint string, src *tlsid.Source) *agentapi.Client {
	c := agentapi.NewClient(endpoint, tlsToken)
	cfg := &tls.Config{InsecureSkipVerify: true}
	if src != nil {
		cfg = src.ClientConfig(func(id tlsid.Identity) error {
			if _, ok := id.Node(); !ok {
				return fmt.Errorf("agent presented %s", id)
			}
			return nil
		})
	}
	c.HTTP.Transport = agentapi.TLSTransport(cfg)
	return c
}

// startTLSAgent runs node's agent with the certificate in dir.
func (e *tlsEnv) startTLSAgent(node, dir, dataDir string) *runningAgent {
	e.t.Helper()
	return e.startTLSAgentNBD(node, dir, dataDir, "")
}

// startTLSAgentNBD is startTLSAgent with the NBD server's TLS mode.
func (e *tlsEnv) startTLSAgentNBD(node, dir, dataDir string, nbdTLS agent.NBDTLSMode) *runningAgent {
	e.t.Helper()
	if dataDir == "" {
		dataDir = e.t.TempDir()
	}
	src := tlsidtest.Load(e.t, dir)
	ctx, cancel := context.WithCancel(context.Background())
	e.t.Cleanup(cancel)
	go src.Watch(ctx, 10*time.Millisecond, logr.Discard())
	e.srcs[node] = src
	return startAgent(e.t, agent.Options{Config: agent.Config{Node: node, DataDir: dataDir, Token: tlsToken, TLS: src}, NBDTLS: nbdTLS})
}

func (e *tlsEnv) put(r *runningAgent, vol string, spec agentapi.Spec) {
	e.t.Helper()
	spec.Mode, spec.PairUID = agentapi.ModeAsync, "uid-"+vol
	if _, err := e.client(r.ep.Control, e.manager).Put(context.Background(), "ns", vol,
		agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10, Spec: spec}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *tlsEnv) status(r *runningAgent, vol string) (agentapi.Status, error) {
	return e.client(r.ep.Control, e.manager).Get(context.Background(), "ns", vol)
}

func (e *tlsEnv) waitInSync(what string, primary *runningAgent, vol string) agentapi.Status {
	e.t.Helper()
	var st agentapi.Status
	testkit.Eventually(e.t, 20*time.Second, what, func() (bool, string) {
		var err error
		st, err = e.status(primary, vol)
		return err == nil && st.PeerConnected && st.OutOfSyncRegions == 0, fmt.Sprintf("%+v %v", st, err)
	}, testkit.Every(20*time.Millisecond))
	return st
}

// replExchange dials addr with cfg (nil: plaintext), sends a Hello naming
// node, and returns the Nack's text, or the error that ended the
// connection without one.
func replExchange(t *testing.T, addr string, cfg *tls.Config, node string) (string, error) {
	t.Helper()
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c := raw
	if cfg != nil {
		c = tls.Client(raw, cfg)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	h := repl.Hello{Volume: "ns/vol", Node: node, Role: "Primary", Epoch: 1, Size: 4 << 20, RegionSize: 64 << 10, PairUID: "uid-vol", Token: tlsToken}
	if _, err := c.Write(repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHello, Epoch: 1, Payload: h.Payload()})); err != nil {
		return "", err
	}
	f, err := repl.NewReader(bufio.NewReader(c), 0).Next()
	if err != nil {
		return "", err
	}
	if f.Type != repl.TypeNack {
		return "", fmt.Errorf("first frame %s, want a Nack", f.Type)
	}
	return string(f.Payload), nil
}

// TestTLSReplication (issue #18): two agents with node certificates of one
// CA replicate over mutual TLS; the backup refuses a primary whose
// certificate names another node than its Hello, one without a
// certificate and one speaking plaintext; the primary refuses a backup
// whose certificate is not the node its spec names; the pair keeps
// replicating through all of it.
func TestTLSReplication(t *testing.T) {
	e := newTLSEnv(t)
	a := e.startTLSAgent("node-a", e.ca.Dir(t, tlsid.NodeIdentity("node-a")), "")
	b := e.startTLSAgent("node-b", e.ca.Dir(t, tlsid.NodeIdentity("node-b")), "")
	if !strings.HasPrefix(b.ep.Control, "https://") {
		t.Fatalf("control endpoint %q, want https://", b.ep.Control)
	}
	// The primary dials node-b's address for a spec naming node-c there
	// (and no spec names another node there): node-b's certificate is
	// refused.
	e.put(a, "vol2", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-c", PeerAddress: b.ep.Replication, Initialize: true})
	testkit.Eventually(t, 10*time.Second, "node-a refuses node-b as node-c", func() (bool, string) {
		return strings.Contains(a.log.String(), "presented the identity of node node-b, want [node-c]"), ""
	})
	if st, err := e.status(a, "vol2"); err != nil || st.PeerConnected {
		t.Errorf("vol2 connected to the wrong node: %+v %v", st, err)
	}

	if err := e.client(a.ep.Control, e.manager).Delete(context.Background(), "ns", "vol2", true); err != nil {
		t.Fatal(err)
	}

	e.put(b, "vol", agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a"})
	e.put(a, "vol", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication, Initialize: true})
	before := e.waitInSync("node-a replicating to node-b over mutual TLS", a, "vol")

	// node-c's certificate, claiming to be node-a: refused after the Hello.
	nodeC := tlsidtest.Load(t, e.ca.Dir(t, tlsid.NodeIdentity("node-c")))
	nack, err := replExchange(t, b.ep.Replication, nodeC.ClientConfig(nil), "node-a")
	if err != nil || !strings.Contains(nack, "TLS certificate names spiffe://tandem.dev/node/node-c") {
		t.Errorf("node-c claiming node-a: Nack %q, %v; want refused for its identity", nack, err)
	}
	// The manager's certificate is no node's either.
	if nack, err := replExchange(t, b.ep.Replication, e.manager.ClientConfig(nil), "node-a"); err != nil || !strings.Contains(nack, "names spiffe://tandem.dev/manager") {
		t.Errorf("the manager claiming node-a: Nack %q, %v; want refused", nack, err)
	}
	// node-c as itself gets past the identity check (and is refused by
	// the volume: its primary is node-a).
	if nack, err := replExchange(t, b.ep.Replication, nodeC.ClientConfig(nil), "node-c"); err != nil || strings.Contains(nack, "TLS certificate") || nack == "" {
		t.Errorf("node-c as itself: Nack %q, %v; want a refusal by the volume", nack, err)
	}
	// No certificate, a certificate of another CA, plaintext: the
	// handshake fails, nothing is answered.
	other := tlsidtest.NewCA(t, "other")
	foreign := tlsidtest.Load(t, other.Dir(t, tlsid.NodeIdentity("node-a"), e.ca))
	for name, cfg := range map[string]*tls.Config{
		"no client certificate":     {InsecureSkipVerify: true},
		"certificate of another CA": foreign.ClientConfig(nil),
		"plaintext":                 nil,
	} {
		nack, err := replExchange(t, b.ep.Replication, cfg, "node-a")
		if nack != "" || err == nil {
			t.Errorf("%s: Nack %q, %v; want the connection closed", name, nack, err)
		}
	}
	testkit.Eventually(t, 5*time.Second, "node-b logs the failed handshakes", func() (bool, string) {
		return strings.Count(b.log.String(), "TLS handshake failed") >= 3, ""
	})

	after := e.waitInSync("still replicating", a, "vol")
	if after.Counters.Reconnects != before.Counters.Reconnects {
		t.Errorf("the link reconnected %d times", after.Counters.Reconnects-before.Counters.Reconnects)
	}
}

// TestTLSControlAPI: with TLS, the control API needs a client certificate
// of the CA for /v1; only the manager's may change anything; the token is
// still required; the probes need no certificate.
func TestTLSControlAPI(t *testing.T) {
	e := newTLSEnv(t)
	a := e.startTLSAgent("node-a", e.ca.Dir(t, tlsid.NodeIdentity("node-a")), "")
	nodeB := tlsidtest.Load(t, e.ca.Dir(t, tlsid.NodeIdentity("node-b")))
	req := agentapi.VolumeRequest{Size: 4 << 20, RegionSize: 64 << 10, Spec: agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-b", Mode: agentapi.ModeAsync}}
	ctx := context.Background()
	code := func(err error) int {
		var ae *agentapi.APIError
		if errors.As(err, &ae) {
			return ae.Code
		}
		if err != nil {
			return -1
		}
		return http.StatusOK
	}

	if _, err := e.client(a.ep.Control, e.manager).Put(ctx, "ns", "vol", req); err != nil {
		t.Fatalf("PUT with the manager's certificate: %v", err)
	}
	_, err := e.client(a.ep.Control, nodeB).Put(ctx, "ns", "vol2", req)
	if code(err) != http.StatusForbidden {
		t.Errorf("PUT with node-b's certificate: %v, want 403", err)
	}
	if err := e.client(a.ep.Control, nodeB).Delete(ctx, "ns", "vol", true); code(err) != http.StatusForbidden {
		t.Errorf("DELETE with node-b's certificate: %v, want 403", err)
	}
	if _, err := e.client(a.ep.Control, nodeB).Get(ctx, "ns", "vol"); err != nil {
		t.Errorf("GET with node-b's certificate: %v, want it read", err)
	}
	if _, err := e.client(a.ep.Control, nil).List(ctx); code(err) != http.StatusForbidden {
		t.Errorf("GET without a certificate: %v, want 403", err)
	}
	if _, err := e.client(a.ep.Control, nil).Put(ctx, "ns", "vol2", req); code(err) != http.StatusForbidden {
		t.Errorf("PUT without a certificate: %v, want 403", err)
	}
	noToken := e.client(a.ep.Control, e.manager)
	noToken.Token = ""
	if _, err := noToken.Put(ctx, "ns", "vol2", req); code(err) != http.StatusUnauthorized {
		t.Errorf("PUT with the manager's certificate and no token: %v, want 401", err)
	}
	if _, err := e.client(a.ep.Control, e.manager).Get(ctx, "ns", "vol2"); !agentapi.IsNotFound(err) {
		t.Errorf("vol2 after the refused PUTs: %v, want not found", err)
	}
	// Plain HTTP to the TLS port gets nothing.
	plain := agentapi.NewClient("http://"+strings.TrimPrefix(a.ep.Control, "https://"), tlsToken)
	if _, err := plain.List(ctx); err == nil || code(err) == http.StatusOK {
		t.Errorf("plain HTTP: %v, want refused", err)
	}
	// The probes need no certificate.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: agentapi.TLSTransport(&tls.Config{InsecureSkipVerify: true})}
	resp, err := hc.Get(a.ep.Control + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz without a certificate: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /healthz without a certificate: %d %s", resp.StatusCode, body)
	}
	// An agent does not start with another node's certificate.
	_, err = agent.New(agent.Config{Node: "node-a", DataDir: t.TempDir(), TLS: nodeB})
	if err == nil || !strings.Contains(err.Error(), "not this node") {
		t.Errorf("agent.New with node-b's certificate as node-a: %v", err)
	}
}

// TestTLSRotation (issue #18): node-a's certificate is replaced by one of a
// new CA while the pair replicates, in the order of a CA rotation (the
// bundles hold the old and the new CA; node-b then drops the old one). Neither agent restarts for it: the open link keeps streaming on its
// session, and when it reconnects node-a presents its new certificate,
// which node-b, trusting only the new CA by then, accepts.
func TestTLSRotation(t *testing.T) {
	e := newTLSEnv(t)
	newCA := tlsidtest.NewCA(t, "tandem-ca-2")
	// Step 1 of the CA rotation is done: everyone trusts both CAs, the
	// manager already has its certificate of the new one.
	e.manager = tlsidtest.Load(t, newCA.Dir(t, tlsid.Manager, e.ca, newCA))
	aDir := e.ca.Dir(t, tlsid.NodeIdentity("node-a"), e.ca, newCA)
	bDir, bData := e.ca.Dir(t, tlsid.NodeIdentity("node-b"), e.ca, newCA), t.TempDir()
	a := e.startTLSAgent("node-a", aDir, "")
	b := e.startTLSAgent("node-b", bDir, bData)
	e.put(b, "vol", agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a"})
	e.put(a, "vol", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication, Initialize: true})
	before := e.waitInSync("replicating with the first certificates", a, "vol")

	// 2. node-a's certificate is reissued by the new CA; node-b trusts
	// only the new CA (its own certificate is still the old CA's: node-a
	// still trusts that one).
	newCA.WriteDir(t, aDir, tlsid.NodeIdentity("node-a"), e.ca, newCA)
	e.ca.WriteDir(t, bDir, tlsid.NodeIdentity("node-b"), newCA)
	// Watch reloads them within 10 ms; reloading here makes sure the
	// files as written last are loaded (a watcher may have read them
	// half-written, and logged that it kept what it had).
	for _, node := range []string{"node-a", "node-b"} {
		if _, err := e.srcs[node].Reload(); err != nil {
			t.Fatal(err)
		}
	}
	// node-a's control API presents the new certificate.
	conn, err := tls.Dial("tcp", strings.TrimPrefix(a.ep.Control, "https://"), e.manager.ClientConfig(nil))
	if err != nil {
		t.Fatal(err)
	}
	if issuer := conn.ConnectionState().PeerCertificates[0].Issuer.CommonName; issuer != "tandem-ca-2" {
		t.Errorf("node-a presents a certificate of %q after the reload", issuer)
	}
	conn.Close()
	// The open link was not disturbed.
	if st := e.waitInSync("still replicating on the link opened before", a, "vol"); st.Counters.Reconnects != before.Counters.Reconnects {
		t.Errorf("the link reconnected %d times during the rotation", st.Counters.Reconnects-before.Counters.Reconnects)
	}

	// The link reconnects (node-b restarts): node-a, never restarted,
	// presents its new certificate, which node-b accepts.
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "node-a without its link", func() (bool, string) {
		st, err := e.status(a, "vol")
		return err == nil && !st.PeerConnected, fmt.Sprintf("%+v %v", st, err)
	}, testkit.Every(20*time.Millisecond))
	b = e.startTLSAgent("node-b", bDir, bData)
	e.put(b, "vol", agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, PeerNode: "node-a"})
	e.put(a, "vol", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: b.ep.Replication})
	e.waitInSync("replicating again over a link opened with node-a's new certificate", a, "vol")
	if strings.Contains(b.log.String(), "TLS handshake failed") {
		t.Error("node-b refused a handshake")
	}
}

// TestTLSProcesses: two agent processes started with --tls-dir replicate a
// volume written through NBD over mutual TLS, called by the manager's
// certificate; an agent given another node's certificate refuses to start.
func TestTLSProcesses(t *testing.T) {
	nbdtest.Require(t, "qemu-io")
	ca := tlsidtest.NewCA(t, "tandem-ca")
	mgr := tlsidtest.Load(t, ca.Dir(t, tlsid.Manager)).ClientConfig(nil)
	a, b := newProc(t, "node-a"), newProc(t, "node-b")
	a.tlsDir, a.tlsClient = ca.Dir(t, tlsid.NodeIdentity("node-a")), mgr
	b.tlsDir, b.tlsClient = ca.Dir(t, tlsid.NodeIdentity("node-b")), mgr
	a.start()
	b.start()
	b.put(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeSync, PeerNode: "node-a"})
	a.put(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeSync, PeerNode: "node-b", PeerAddress: b.repl})
	waitInSync(t, a, b)
	qemuIO(t, a.url(), "write -P 0x5a 1M 2M", "flush")
	waitInSync(t, a, b)
	if ha, hb := testkit.FileSHA256(t, a.dataPath()), testkit.FileSHA256(t, b.dataPath()); ha != hb {
		t.Fatal("the replicas differ after writes over the TLS link")
	}

	c := newProc(t, "node-c")
	c.tlsDir = ca.Dir(t, tlsid.NodeIdentity("node-a"))
	cmd := exec.Command(buildAgent(t), "--node", "node-c", "--data-dir", filepath.Join(c.dir, "data"), "--insecure-no-auth",
		"--control-address", "127.0.0.1:0", "--replication-address", "127.0.0.1:0", "--nbd-address", "127.0.0.1:0", "--tls-dir", c.tlsDir)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "spiffe://tandem.dev/node/node-a, want spiffe://tandem.dev/node/node-c") {
		t.Errorf("node-c with node-a's certificate: %v\n%s", err, out)
	}
}

// TestTLSBackupIdentity: a backup whose certificate names node-b but whose
// HelloAck names another node is refused by the primary before the link
// comes up (the primary's volume would keep its bitmaps about the node the
// HelloAck names).
func TestTLSBackupIdentity(t *testing.T) {
	e := newTLSEnv(t)
	a := e.startTLSAgent("node-a", e.ca.Dir(t, tlsid.NodeIdentity("node-a")), "")
	nodeB := tlsidtest.Load(t, e.ca.Dir(t, tlsid.NodeIdentity("node-b")))
	ln := tls.NewListener(testkit.Listen(t), nodeB.ServerConfig(true))
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				f, err := repl.NewReader(c, 0).Next()
				if err != nil || f.Type != repl.TypeHello {
					return
				}
				ack := fmt.Appendf(nil, `{"node":%q,"dataState":"UpToDate"}`, "node-x")
				b := repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHelloAck, Epoch: f.Epoch, Payload: ack})
				b = repl.AppendFrame(b, &repl.Frame{Type: repl.TypeBitmap, Epoch: f.Epoch})
				_, _ = c.Write(b)
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	e.put(a, "vol", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: ln.Addr().String(), Initialize: true})
	testkit.Eventually(t, 10*time.Second, "node-a refuses the backup's HelloAck", func() (bool, string) {
		return strings.Contains(a.log.String(), `the backup's HelloAck names node \"node-x\", its TLS certificate node \"node-b\"`), ""
	})
	if strings.Contains(a.log.String(), "Replication link up") {
		t.Error("the link came up with a backup naming another node than its certificate")
	}
}

// /v1/info and the metric tandem_agent_tls_not_after_seconds name the
// certificate the agent presents, and follow a renewal (what an e2e
// watches to see a rotation).
func TestTLSInfoFollowsRenewal(t *testing.T) {
	e := newTLSEnv(t)
	dir := e.ca.Dir(t, tlsid.NodeIdentity("node-a"))
	a := e.startTLSAgent("node-a", dir, "")
	c := e.client(a.ep.Control, e.manager)
	ctx := context.Background()
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	src := e.srcs["node-a"]
	if info.TLS == nil || info.TLS.Serial != src.Serial() || !info.TLS.NotAfter.Equal(src.NotAfter()) || info.TLS.Identity != string(tlsid.NodeIdentity("node-a")) {
		t.Fatalf("info.TLS = %+v, want serial %s notAfter %v", info.TLS, src.Serial(), src.NotAfter())
	}
	first := info.TLS.Serial
	e.ca.WriteDir(t, dir, tlsid.NodeIdentity("node-a"))
	if _, err := src.Reload(); err != nil {
		t.Fatal(err)
	}
	info, err = c.Info(ctx)
	if err != nil || info.TLS == nil || info.TLS.Serial == first || info.TLS.Serial != src.Serial() {
		t.Fatalf("after a renewal: info.TLS = %+v, %v; want the new serial %s", info.TLS, err, src.Serial())
	}
	// The metric, on the same control port (the probes' side: no client
	// certificate needed).
	resp, err := e.client(a.ep.Control, nil).HTTP.Get(a.ep.Control + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !containsMetric(string(body), src.Serial(), src.NotAfter().Unix()) {
		t.Errorf("/metrics lacks tandem_agent_tls_not_after_seconds{serial=%q} %d:\n%s", src.Serial(), src.NotAfter().Unix(), grepLines(string(body), "tandem_agent_tls"))
	}
}

func containsMetric(body, serial string, v int64) bool {
	for _, l := range strings.Split(body, "\n") {
		if !strings.HasPrefix(l, `tandem_agent_tls_not_after_seconds{serial="`+serial+`"} `) {
			continue
		}
		f, err := strconv.ParseFloat(strings.Fields(l)[1], 64)
		return err == nil && int64(f) == v
	}
	return false
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestTLSNBD: the agent's NBD port offers STARTTLS with its node
// certificate (clients then present one of the CA naming a Tandem
// identity), or requires it; a client that asked for TLS never gets plain
// text.
func TestTLSNBD(t *testing.T) {
	e := newTLSEnv(t)
	nodeC := tlsidtest.Load(t, e.ca.Dir(t, tlsid.NodeIdentity("node-c"))).ClientConfig(nil)
	other := tlsidtest.Load(t, tlsidtest.NewCA(t, "other").Dir(t, tlsid.NodeIdentity("node-c"), e.ca)).ClientConfig(nil)
	for _, tc := range []struct {
		mode agent.NBDTLSMode
		tls  *tls.Config
		want string // "" when served
	}{
		{mode: agent.NBDTLSOffer, tls: nodeC},
		{mode: agent.NBDTLSOffer},
		{mode: agent.NBDTLSOffer, tls: e.manager.ClientConfig(nil)},
		{mode: agent.NBDTLSOffer, tls: other, want: "tls: unknown certificate authority"},
		{mode: agent.NBDTLSRequire, tls: nodeC},
		{mode: agent.NBDTLSRequire, want: "NBD_REP_ERR_TLS_REQD"},
		{mode: agent.NBDTLSOff},
		{mode: agent.NBDTLSOff, tls: nodeC, want: "NBD_OPT_STARTTLS refused (NBD_REP_ERR_UNSUP)"},
	} {
		name := fmt.Sprintf("%s, TLS client %v, want %q", tc.mode, tc.tls != nil, tc.want)
		t.Run(name, func(t *testing.T) {
			a := e.startTLSAgentNBD("node-a", e.ca.Dir(t, tlsid.NodeIdentity("node-a")), "", tc.mode)
			e.put(a, "vol", agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, PeerNode: "node-b", PeerAddress: testkit.RefusingAddr(t), Initialize: true})
			var opts []nbd.ClientOption
			if tc.tls != nil {
				opts = append(opts, nbd.WithTLS(tc.tls))
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := nbd.Dial(ctx, a.ep.NBD, "ns/vol", opts...)
			if err == nil {
				defer c.Close()
				err = c.WriteAt(ctx, []byte("over the NBD port"), 0, true)
			}
			if tc.want == "" && err != nil {
				t.Fatalf("NBD: %v", err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("NBD: %v, want an error with %q", err, tc.want)
			}
		})
	}

	// Required without TLS material: Run refuses to start.
	err := agent.Run(context.Background(), agent.Options{Config: agent.Config{Node: "node-a", DataDir: t.TempDir(), Token: tlsToken},
		Control: testkit.Listen(t), Replication: testkit.Listen(t), NBD: testkit.Listen(t), NBDTLS: agent.NBDTLSRequire})
	if err == nil || !strings.Contains(err.Error(), "NBD TLS required (--nbd-tls=require) without TLS material") {
		t.Fatalf("Run with NBD TLS required and no TLS: %v", err)
	}
}
