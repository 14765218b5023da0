package agent_test

// Resource limits of a running agent:
// unauthenticated replication connections, busy NBD clients, accept errors
// and slow or idle control API clients must not exhaust the agent.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/budget"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// limitsAgent is an agent run by agent.Run on loopback (control API,
// replication listener, NBD server), and a control API client.
type limitsAgent struct {
	a        *agent.Agent
	c        *agent.Client
	log      *logBuf
	replAddr string
	nbdAddr  string
}

func newLimitsAgent(t *testing.T, cfg agent.Config) *limitsAgent {
	t.Helper()
	cfg.Node, cfg.DataDir, cfg.Token = "node-b", t.TempDir(), abuseToken
	r := startAgent(t, agent.Options{Config: cfg})
	return &limitsAgent{a: r.Agent, c: r.c, log: r.log, replAddr: r.ep.Replication, nbdAddr: r.ep.NBD}
}

// emfileListener fails its first n Accepts with err, as a process out of
// file descriptors sees.
type emfileListener struct {
	net.Listener
	n   atomic.Int32
	err error
}

func (l *emfileListener) Accept() (net.Conn, error) {
	if l.n.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", l.err)}
	}
	return l.Listener.Accept()
}

// TestReplicationAcceptErrorsRetried: accept errors that pass (out of file
// descriptors, an aborted connection) do not end the replication listener:
// it logs them, backs off and serves the next connection.
func TestReplicationAcceptErrorsRetried(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ECONNABORTED} {
		t.Run(errno.Error(), func(t *testing.T) {
			log := &logBuf{}
			a, err := agent.New(agent.Config{Node: "node-b", DataDir: t.TempDir(), Token: abuseToken,
				Log: funcr.New(func(prefix, args string) { log.add(prefix + " " + args) }, funcr.Options{})})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			inner, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ln := &emfileListener{Listener: inner, err: errno}
			ln.n.Store(5)
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- a.ServeReplication(ctx, ln) }()
			defer func() {
				cancel()
				<-served
			}()
			testkit.Eventually(t, 10*time.Second, "the failing accepts retried", func() (bool, string) {
				select {
				case err := <-served:
					served <- err // for the deferred wait
					return true, ""
				default:
				}
				return ln.n.Load() < 0, fmt.Sprint(ln.n.Load())
			})
			select {
			case err := <-served:
				served <- err
				t.Fatalf("the replication listener ended on an accept error: %v", err)
			default:
			}
			// Still serving: a Hello with a wrong token gets its Nack.
			frames, _ := exchange(t, inner.Addr().String(), 5*time.Second, false, hello("ns/x", "node-x", 1, "guess"))
			if !strings.Contains(nackText(frames), "authentication failed") {
				t.Fatalf("after the accept errors: answer %v, want a Nack", frames)
			}
			if !strings.Contains(log.String(), "accept failed; retrying") || !strings.Contains(log.String(), errno.Error()) {
				t.Fatalf("the accept errors are not logged:\n%s", log)
			}
		})
	}
}

// TestReplicationConnectionLimits: connections beyond the limits (all
// connections, or those not authenticated yet) are closed at once with a
// logged reason; a slot freed is usable again.
func TestReplicationConnectionLimits(t *testing.T) {
	for _, tc := range []struct {
		name             string
		conns, handshake int
		reason           string
	}{
		{"unauthenticated connections", 8, 3, "too many connections that have not authenticated yet (limit 3)"},
		{"all connections", 2, 10, "too many connections (limit 2)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newLimitsAgent(t, agent.Config{MaxReplicationConns: tc.conns, MaxReplicationHandshakes: tc.handshake})
			limit := min(tc.conns, tc.handshake)
			idle := make([]net.Conn, limit)
			for i := range idle {
				c, err := net.Dial("tcp", e.replAddr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				idle[i] = c
			}
			testkit.Eventually(t, 10*time.Second, "the idle connections counted", func() (bool, string) {
				return replConnMetric(t, e.c, "handshaking") == limit, fmt.Sprint(replConnMetric(t, e.c, "handshaking"))
			})
			over, err := net.Dial("tcp", e.replAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer over.Close()
			if !closedWithin(over, 2*time.Second) {
				t.Fatalf("a connection over the limit of %d stayed open", limit)
			}
			if !e.log.waitLogged(over.LocalAddr().String(), tc.reason) {
				t.Fatalf("no log line about %s saying %q", over.LocalAddr(), tc.reason)
			}
			// A slot freed is usable again.
			idle[0].Close()
			testkit.Eventually(t, 10*time.Second, "the closed connection released", func() (bool, string) {
				n := replConnMetric(t, e.c, "handshaking")
				return n == limit-1, fmt.Sprint(n)
			})
			frames, _ := exchange(t, e.replAddr, 5*time.Second, false, hello("ns/x", "node-x", 1, "guess"))
			if !strings.Contains(nackText(frames), "authentication failed") {
				t.Fatalf("after a slot was freed: answer %v, want a Nack", frames)
			}
		})
	}
}

// replConnMetric reads tandem_agent_replication_connections{state=...}.
func replConnMetric(t *testing.T, c *agent.Client, state string) int {
	t.Helper()
	resp, err := http.Get(c.BaseURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	prefix := `tandem_agent_replication_connections{state="` + state + `"} `
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			var n int
			fmt.Sscan(v, &n)
			return n
		}
	}
	t.Fatalf("no %s in /metrics", prefix)
	return 0
}

// heapInuse returns the heap in use after a collection.
func heapInuse() int64 {
	runtime.GC()
	runtime.GC() // and again, for what the first one left to sync.Pools' victim caches
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// TestAbuseHeapBounded: unauthenticated replication connections each
// announcing a 32 MiB Hello, and NBD clients pipelining 16 MiB writes to a
// volume that holds them (a failback hold), while the agent's heap is
// watched: it grows by no more than the in-flight budget plus a margin,
// where it used to grow by 32 MiB per replication connection and up to
// 128 MiB per NBD connection. Every held write completes afterwards.
func TestAbuseHeapBounded(t *testing.T) {
	const (
		bud       = 32 << 20
		margin    = 16 << 20
		replConns = 8
		nbdConns  = 4
		perConn   = 3
		wsize     = 16 << 20
	)
	b := budget.New(bud)
	e := newLimitsAgent(t, agent.Config{Budget: b})
	spec := volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, Hold: true}
	if _, err := e.c.Put(context.Background(), "ns", "held", agent.VolumeRequest{Size: 64 << 20, RegionSize: abuseRegion, Spec: spec}); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, wsize) // the clients' data, shared: not the agent's
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	clients := make([]*rawNBD, nbdConns)
	for i := range clients {
		clients[i] = dialNBD(t, e.nbdAddr, "ns/held")
	}
	base := heapInuse()

	// Anonymous replication peers: a Hello header announcing 32 MiB, then
	// nothing.
	hdr := hello("ns/held", "node-x", 1, abuseToken)[:repl.HeaderLen]
	binary.BigEndian.PutUint32(hdr[36:], repl.MaxPayload)
	repls := make([]net.Conn, replConns)
	for i := range repls {
		c, err := net.Dial("tcp", e.replAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write(hdr); err != nil {
			t.Fatal(err)
		}
		repls[i] = c
	}
	// NBD clients: pipelined 16 MiB writes, from goroutines (the agent may
	// not read them for a while).
	var sendWG sync.WaitGroup
	for i, r := range clients {
		sendWG.Go(func() {
			_ = r.c.SetWriteDeadline(time.Now().Add(2 * time.Minute))
			for j := range perConn {
				h := binary.BigEndian.AppendUint32(nil, nbdReqMagic)
				h = binary.BigEndian.AppendUint16(h, 0)
				h = binary.BigEndian.AppendUint16(h, cmdWrite)
				h = binary.BigEndian.AppendUint64(h, uint64(j))
				h = binary.BigEndian.AppendUint64(h, uint64((i*perConn+j)%4)*wsize)
				h = binary.BigEndian.AppendUint32(h, wsize)
				if _, err := r.c.Write(h); err != nil {
					t.Errorf("NBD client %d: %v", i, err)
					return
				}
				if _, err := r.c.Write(payload); err != nil {
					t.Errorf("NBD client %d: %v", i, err)
					return
				}
			}
		})
	}
	testkit.Eventually(t, 30*time.Second, "writes held by the volume", func() (bool, string) {
		st, err := e.c.Get(context.Background(), "ns", "held")
		return err == nil && st.HeldWrites >= bud/wsize, fmt.Sprintf("%+v %v", st.HeldWrites, err)
	})
	// Give the abusers time to push whatever the agent lets in.
	for _, c := range repls {
		closedWithin(c, time.Second)
	}
	time.Sleep(500 * time.Millisecond)
	grew := heapInuse() - base
	st, _ := e.c.Get(context.Background(), "ns", "held")
	t.Logf("heap grew by %d MiB under the abuse (budget %d MiB, %d writes held, budget %+v)", grew>>20, bud>>20, st.HeldWrites, b.Stats())
	if grew > bud+margin {
		t.Fatalf("the agent's heap grew by %d MiB under %d anonymous replication connections and %d NBD connections; budget %d MiB + margin %d MiB",
			grew>>20, replConns, nbdConns, bud>>20, margin>>20)
	}
	for _, c := range repls {
		if !e.log.waitLogged(c.LocalAddr().String(), "payload too large") {
			t.Errorf("no log line about the oversized Hello from %s", c.LocalAddr())
		}
	}

	// The hold ends: every write waiting for the budget completes.
	spec.Hold = false
	if _, err := e.c.Put(context.Background(), "ns", "held", agent.VolumeRequest{Size: 64 << 20, RegionSize: abuseRegion, Spec: spec}); err != nil {
		t.Fatal(err)
	}
	sendWG.Wait()
	for i, r := range clients {
		for range perConn {
			_ = r.c.SetReadDeadline(time.Now().Add(time.Minute))
			h := make([]byte, 16)
			if _, err := io.ReadFull(r.c, h); err != nil {
				t.Fatalf("NBD client %d: reply: %v", i, err)
			}
			if errno := binary.BigEndian.Uint32(h[4:]); errno != 0 {
				t.Fatalf("NBD client %d: a write that waited for the budget failed with errno %d", i, errno)
			}
		}
	}
	testkit.Eventually(t, 10*time.Second, "the budget given back", func() (bool, string) {
		s := b.Stats()
		return s.InUse == 0, fmt.Sprintf("%+v", s)
	})
	if s := b.Stats(); s.Peak > bud {
		t.Fatalf("budget peak %d > %d", s.Peak, bud)
	}
}

// TestControlAPILimits: slow or idle control API clients are dropped within
// the configured timeouts, and at most MaxConns connections are served at
// once.
func TestControlAPILimits(t *testing.T) {
	a, err := agent.New(agent.Config{Node: "node-b", DataDir: t.TempDir(), Token: abuseToken,
		Log: funcr.New(func(string, string) {}, funcr.Options{})})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	serve := func(lim agent.ControlLimits) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.ServeControl(ctx, ln, lim) }()
		t.Cleanup(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("ServeControl: %v", err)
			}
		})
		return ln.Addr().String()
	}
	addr := serve(agent.ControlLimits{ReadHeaderTimeout: 300 * time.Millisecond, ReadTimeout: 600 * time.Millisecond,
		WriteTimeout: 2 * time.Second, IdleTimeout: 500 * time.Millisecond})
	dial := func(t *testing.T, addr string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	for _, tc := range []struct {
		name   string
		send   string
		within time.Duration
	}{
		{"nothing sent", "", 2 * time.Second},
		{"half a header", "GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Slow: ", 2 * time.Second},
		{"a body that never comes", "PUT /v1/volumes/ns/x HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer " + abuseToken +
			"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"size\":", 2 * time.Second},
		{"idle after a request", "GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n", 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, addr)
			if _, err := io.WriteString(c, tc.send); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if !closedWithin(c, tc.within) {
				t.Fatalf("the control API kept the connection open for %v", tc.within)
			}
			t.Logf("closed after %v", time.Since(start).Round(time.Millisecond))
		})
	}
	t.Run("header too large", func(t *testing.T) {
		addr := serve(agent.ControlLimits{MaxHeaderBytes: 4 << 10})
		c := dial(t, addr)
		req := "GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Big: " + strings.Repeat("a", 64<<10) + "\r\n\r\n"
		_, _ = io.WriteString(c, req)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("64 KiB of headers: %v, %v; want 431", resp, err)
		}
	})
	t.Run("connection cap", func(t *testing.T) {
		addr := serve(agent.ControlLimits{MaxConns: 2})
		held := []net.Conn{dial(t, addr), dial(t, addr)}
		for _, c := range held { // both accepted and served once
			if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 200 {
				t.Fatalf("healthz: %v, %v", resp, err)
			}
		}
		third := dial(t, addr)
		if _, err := io.WriteString(third, "GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(third)
		_ = third.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err := br.Peek(1)
		var ne net.Error
		switch {
		case err == nil:
			t.Fatal("a third connection was served with two open and a cap of 2")
		case !errors.As(err, &ne) || !ne.Timeout():
			t.Fatalf("third connection: %v", err)
		}
		held[0].Close()
		_ = third.SetReadDeadline(time.Now().Add(5 * time.Second))
		if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 200 {
			t.Fatalf("third connection once a slot was free: %v, %v", resp, err)
		}
	})
}
