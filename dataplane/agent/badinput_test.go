package agent_test

// Bad replication input (invariant 7, docs/architecture.md): hostile or broken streams
// against a running agent's replication listener. Each one must close that
// connection with a logged reason, while a healthy pair on the same agent
// keeps replicating without a hiccup and the attacked volume stays intact
// and usable by its real primary.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/internal/testkit"
)

const (
	abuseToken  = "abuse-token"
	abuseSize   = 16 << 20
	abuseRegion = 64 << 10
)

// logBuf collects log lines.
type logBuf struct {
	mu    sync.Mutex
	lines []string
}

func (l *logBuf) add(s string) {
	l.mu.Lock()
	l.lines = append(l.lines, s)
	l.mu.Unlock()
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// about reports whether a line about the connection from remote contains
// text.
func (l *logBuf) about(remote, text string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.lines {
		if strings.Contains(s, `"remote"="`+remote+`"`) && strings.Contains(s, text) {
			return true
		}
	}
	return false
}

// waitLogged waits up to 2 s for a line about remote containing text.
func (l *logBuf) waitLogged(remote, text string) bool {
	return testkit.Wait(2*time.Second, "a log line", func() bool { return l.about(remote, text) }) == nil
}

// abuseEnv is an agent ("node-b") serving replication on loopback, with a
// healthy pair ns/healthy streaming from an in-process primary, and a victim
// volume ns/victim: a backup at epoch 5 waiting for its primary "node-x".
type abuseEnv struct {
	t        *testing.T
	a        *agent.Agent
	c        *agent.Client
	dir      string
	replAddr string
	log      *logBuf

	healthy *volume.Volume
	hstore  *store.Mem
	hlog    *logBuf
	writes  atomic.Int64
	stopW   chan struct{}
	wdone   chan struct{}
}

func newAbuseEnv(t *testing.T) *abuseEnv {
	t.Helper()
	e := &abuseEnv{t: t, dir: t.TempDir(), log: &logBuf{}, hlog: &logBuf{}}
	t.Cleanup(func() { // runs after the agent's cleanup, which prints its log
		if t.Failed() {
			t.Logf("---- healthy primary log ----\n%s", e.hlog)
		}
	})
	r := startAgent(t, agent.Options{Config: agent.Config{Node: "node-b", DataDir: e.dir, Token: abuseToken}})
	e.a, e.c, e.log, e.replAddr = r.Agent, r.c, r.log, r.ep.Replication
	put := func(name string, spec volume.Spec) {
		if _, err := e.c.Put(context.Background(), "ns", name, agent.VolumeRequest{Size: abuseSize, RegionSize: abuseRegion, Spec: spec}); err != nil {
			t.Fatalf("PUT ns/%s: %v", name, err)
		}
	}
	put("healthy", volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeSync, PeerNode: "node-a"})
	put("victim", volume.Spec{Role: volume.RoleBackup, Epoch: 5, Mode: volume.ModeAsync, PeerNode: "node-x"})

	// The healthy pair's primary, in-process, with a writer that never stops.
	e.hstore = store.NewMem(abuseSize)
	hl := funcr.New(func(prefix, args string) { e.hlog.add(prefix + " " + args) }, funcr.Options{})
	v, err := volume.Open(volume.Options{Name: "ns/healthy", Node: "node-a", Dir: t.TempDir(), Size: abuseSize, RegionSize: abuseRegion,
		Store: e.hstore, Token: func() string { return abuseToken }, CheckpointInterval: 100 * time.Millisecond, Log: hl})
	if err != nil {
		t.Fatal(err)
	}
	e.healthy = v
	t.Cleanup(func() { _ = v.Close() })
	if err := v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeSync, PeerNode: "node-b", PeerAddress: e.replAddr}); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 20*time.Second, "healthy pair linked", func() (bool, string) {
		st := v.Status()
		return st.PeerConnected, fmt.Sprintf("%+v", st)
	})
	e.stopW, e.wdone = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(e.wdone)
		rng := mrand.New(mrand.NewPCG(5, 6))
		buf := make([]byte, 16<<10)
		for {
			select {
			case <-e.stopW:
				return
			default:
			}
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
			off := rng.Int64N(abuseSize/4096-4) * 4096
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err := v.WriteAt(ctx, buf, off, rng.IntN(8) == 0)
			cancel()
			if err != nil {
				t.Errorf("healthy pair: write at %d failed during the abuse: %v", off, err)
				return
			}
			e.writes.Add(1)
			time.Sleep(time.Millisecond)
		}
	}()
	return e
}

// checkHealthy stops the writer and checks the healthy pair never dropped
// its link and ends identical.
func (e *abuseEnv) checkHealthy() {
	t := e.t
	t.Helper()
	close(e.stopW)
	<-e.wdone
	st := e.healthy.Status()
	if st.Counters.Reconnects != 0 || !st.PeerConnected {
		t.Errorf("the healthy pair's link was disturbed by the abuse: %d reconnects, connected %v", st.Counters.Reconnects, st.PeerConnected)
	}
	if e.writes.Load() == 0 {
		t.Error("the healthy pair wrote nothing during the abuse")
	}
	testkit.Eventually(t, 20*time.Second, "healthy pair in sync", func() (bool, string) {
		ps := e.healthy.Status()
		return ps.PeerConnected && ps.OutOfSyncRegions == 0 && ps.OldestUnreplicatedSeconds == 0, fmt.Sprintf("%+v", ps)
	})
	if err := e.healthy.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, abuseSize)
	if _, err := e.hstore.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(e.dir, "volumes", "ns", "healthy", "data"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("the healthy pair's backup differs from its primary after the abuse")
	}
	t.Logf("healthy pair: %d writes replicated during the abuse, 0 reconnects", e.writes.Load())
}

func hello(vol, node string, epoch uint64, tok string) []byte {
	h := repl.Hello{Volume: vol, Node: node, Role: "Primary", Epoch: epoch, Size: abuseSize, RegionSize: abuseRegion, Token: tok}
	return repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHello, Epoch: epoch, Payload: h.Payload()})
}

// exchange sends parts, half-closes the connection unless keepOpen (a peer
// that stalls), then reads what the agent answers until it closes the
// connection. It fails the test if the connection stays open longer than
// wait.
func exchange(t *testing.T, addr string, wait time.Duration, keepOpen bool, parts ...[]byte) (frames []repl.Frame, local string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	local = c.LocalAddr().String()
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		if _, err := c.Write(p); err != nil {
			break // the agent may close before reading everything
		}
	}
	if !keepOpen {
		_ = c.(*net.TCPConn).CloseWrite()
	}
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(wait))
	rd := repl.NewReader(bufio.NewReader(c), 0)
	for {
		f, err := rd.Next()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the agent kept the connection open for %v", wait)
			}
			return frames, local
		}
		cp := *f
		cp.Payload = append([]byte(nil), f.Payload...)
		frames = append(frames, cp)
	}
}

func nackText(frames []repl.Frame) string {
	for _, f := range frames {
		if f.Type == repl.TypeNack {
			return string(f.Payload)
		}
	}
	return ""
}

// TestBadReplicationInput: each case opens a connection to the agent's
// replication listener, misbehaves, and expects the connection closed, an
// optional Nack with a reason, and the reason in the agent's log.
func TestBadReplicationInput(t *testing.T) {
	tl := stresstest.NewTally(t, "bad-replication-input")
	e := newAbuseEnv(t)
	ok := hello("ns/victim", "node-x", 5, abuseToken)
	garbage := make([]byte, 300)
	rng := mrand.New(mrand.NewPCG(7, 8))
	for i := range garbage {
		garbage[i] = byte(rng.Uint32())
	}
	badCRC := append([]byte(nil), ok...)
	badCRC[40] ^= 0xff
	oversize := append([]byte(nil), ok[:repl.HeaderLen]...)
	binary.BigEndian.PutUint32(oversize[36:], repl.MaxPayload+1)
	badVersion := append([]byte(nil), ok...)
	badVersion[4] = 9
	badJSON := repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHello, Epoch: 5, Payload: []byte(`{"volume":`)})
	noVolume := repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHello, Epoch: 5, Payload: []byte(`{"node":"node-x","size":1,"regionSize":1}`)})
	ping := repl.AppendFrame(nil, &repl.Frame{Type: repl.TypePing, Epoch: 5})
	undefinedType := append([]byte(nil), ping...)
	undefinedType[5] = 200
	// Re-checksum so only the type is wrong.
	undefinedType = rechecksum(undefinedType)
	geometry := repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHello, Epoch: 5, Payload: repl.Hello{
		Volume: "ns/victim", Node: "node-x", Epoch: 5, Size: abuseSize, RegionSize: abuseRegion * 2, Token: abuseToken}.Payload()})
	// A primary larger than the backup (it grew first): refused until the
	// backup grows.
	larger := repl.AppendFrame(nil, &repl.Frame{Type: repl.TypeHello, Epoch: 5, Payload: repl.Hello{
		Volume: "ns/victim", Node: "node-x", Epoch: 5, Size: abuseSize * 2, RegionSize: abuseRegion, Token: abuseToken}.Payload()})

	cases := []struct {
		name    string
		parts   [][]byte
		nack    string // expected in the Nack's text ("" = no Nack expected)
		log     string // expected in the agent's log
		idle    bool
		maxWait time.Duration
	}{
		{name: "closed before Hello", log: "bad first frame"},
		{name: "garbage bytes", parts: [][]byte{garbage}, log: "bad frame magic"},
		{name: "half a Hello", parts: [][]byte{ok[:len(ok)/2]}, log: "unexpected EOF"},
		{name: "half a header", parts: [][]byte{ok[:20]}, log: "unexpected EOF"},
		{name: "bad checksum", parts: [][]byte{badCRC}, log: "checksum mismatch"},
		{name: "oversize payload", parts: [][]byte{oversize}, log: "payload too large"},
		{name: "unknown version", parts: [][]byte{badVersion}, log: "unsupported frame version"},
		{name: "undefined frame type", parts: [][]byte{undefinedType}, log: "malformed frame"},
		{name: "not a Hello first", parts: [][]byte{ping}, log: "first frame is not Hello"},
		{name: "Hello not JSON", parts: [][]byte{badJSON}, log: "bad Hello"},
		{name: "Hello without volume", parts: [][]byte{noVolume}, log: "bad Hello"},
		{name: "no token", parts: [][]byte{hello("ns/victim", "node-x", 5, "")}, nack: "authentication failed", log: "wrong or missing token"},
		{name: "wrong token", parts: [][]byte{hello("ns/victim", "node-x", 5, "guess")}, nack: "authentication failed", log: "wrong or missing token"},
		{name: "unknown volume", parts: [][]byte{hello("ns/nope", "node-x", 5, abuseToken)}, nack: `no volume "ns/nope"`, log: `no volume \"ns/nope\"`},
		{name: "stale epoch", parts: [][]byte{hello("ns/victim", "node-x", 4, abuseToken)}, nack: "epoch mismatch", log: "epoch mismatch"},
		{name: "future epoch", parts: [][]byte{hello("ns/victim", "node-x", 6, abuseToken)}, nack: "epoch mismatch", log: "epoch mismatch"},
		{name: "wrong primary", parts: [][]byte{hello("ns/victim", "node-evil", 5, abuseToken)}, nack: "expects its primary to be node-x", log: "expects its primary"},
		{name: "geometry mismatch", parts: [][]byte{geometry}, nack: "geometry mismatch", log: "geometry mismatch"},
		{name: "larger primary", parts: [][]byte{larger}, nack: "the backup must grow first", log: "size mismatch"},
		{name: "Hello to the healthy volume's backup from a stale primary", parts: [][]byte{hello("ns/healthy", "node-a", 0, abuseToken)}, nack: "epoch mismatch", log: "epoch mismatch"},
		{name: "idle connection", idle: true, log: "i/o timeout", maxWait: 15 * time.Second},
		{name: "stalled half Hello", parts: [][]byte{ok[:len(ok)-3]}, idle: true, log: "i/o timeout", maxWait: 15 * time.Second},
	}
	for trial := range stresstest.Trials(1) {
		var wg sync.WaitGroup
		for _, tc := range cases {
			if tc.idle && trial > 0 {
				continue // 10 s each; once is enough
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				wait := tc.maxWait
				if wait == 0 {
					wait = 5 * time.Second
				}
				frames, local := exchange(t, e.replAddr, wait, tc.idle, tc.parts...)
				tl.Faults.Add(1)
				if tc.nack != "" && !strings.Contains(nackText(frames), tc.nack) {
					tl.Violated.Add(1)
					t.Errorf("%s: answer %v, want a Nack containing %q", tc.name, frames, tc.nack)
				}
				if tc.nack == "" && len(frames) > 0 {
					t.Errorf("%s: the agent answered %v to a malformed stream", tc.name, frames)
				}
				// The reason is logged (maybe just after the close).
				if !e.log.waitLogged(local, tc.log) {
					tl.Violated.Add(1)
					t.Errorf("%s: no log line about the connection from %s containing %q", tc.name, local, tc.log)
				}
			}()
		}
		wg.Wait()
		tl.Trials.Add(1)
	}

	// Inside an accepted stream: a fake primary passes the handshake as
	// node-x at epoch 5, then sends bad frames. Sequential: each new stream
	// replaces the previous one on the victim.
	w := func(f repl.Frame) []byte { return repl.AppendFrame(nil, &f) }
	data := bytes.Repeat([]byte{0xab}, 4096)
	inStream := []struct {
		name, nack, log string
		frame           []byte
	}{
		{"write past the end", "outside the volume", "outside the volume",
			w(repl.Frame{Type: repl.TypeWrite, Epoch: 5, Seq: 1, Offset: abuseSize, Length: 4096, Payload: data})},
		{"write straddling the end", "outside the volume", "outside the volume",
			w(repl.Frame{Type: repl.TypeWrite, Epoch: 5, Seq: 1, Offset: abuseSize - 2048, Length: 4096, Payload: data})},
		{"copy far past the end", "outside the volume", "outside the volume",
			w(repl.Frame{Type: repl.TypeCopyData, Epoch: 5, Seq: 1, Offset: 1 << 62, Length: 4096, Payload: data})},
		{"trim past the end", "outside the volume", "outside the volume",
			w(repl.Frame{Type: repl.TypeTrim, Epoch: 5, Seq: 1, Offset: abuseSize - 4096, Length: 1 << 31})},
		{"zero past the end", "outside the volume", "outside the volume",
			w(repl.Frame{Type: repl.TypeZero, Epoch: 5, Seq: 1, Offset: abuseSize, Length: 1})},
		{"write from an older epoch", "refused by member node-b at epoch 5", "refused by member node-b at epoch 5",
			w(repl.Frame{Type: repl.TypeWrite, Epoch: 4, Seq: 1, Offset: 0, Length: 4096, Payload: data})},
		{"write from a newer epoch", "refused by member node-b at epoch 5", "refused by member node-b at epoch 5",
			w(repl.Frame{Type: repl.TypeWrite, Epoch: 6, Seq: 1, Offset: 0, Length: 4096, Payload: data})},
		{"unexpected frame type", "", "unexpected Ack frame from the primary",
			w(repl.Frame{Type: repl.TypeAck, Epoch: 5, Seq: 1})},
		{"second Hello", "", "unexpected Hello frame from the primary", ok},
		{"garbage after the handshake", "", "bad frame magic", garbage},
		{"bad checksum after the handshake", "", "checksum mismatch",
			func() []byte {
				b := w(repl.Frame{Type: repl.TypeWrite, Epoch: 5, Seq: 1, Offset: 0, Length: 4096, Payload: data})
				b[len(b)-1] ^= 1
				return b
			}()},
		{"half a write frame", "", "unexpected EOF",
			w(repl.Frame{Type: repl.TypeWrite, Epoch: 5, Seq: 1, Offset: 0, Length: 4096, Payload: data})[:3000]},
		{"oversize write frame", "", "payload too large",
			func() []byte {
				b := w(repl.Frame{Type: repl.TypeWrite, Epoch: 5, Seq: 1, Offset: 0, Length: 4096, Payload: data})[:repl.HeaderLen]
				binary.BigEndian.PutUint32(b[36:], 1<<31)
				return b
			}()},
	}
	for _, tc := range inStream {
		frames, local := exchange(t, e.replAddr, 10*time.Second, false, ok, tc.frame)
		tl.Faults.Add(1)
		if len(frames) < 2 || frames[0].Type != repl.TypeHelloAck || frames[1].Type != repl.TypeBitmap {
			t.Errorf("%s: handshake answer %v, want HelloAck and Bitmap", tc.name, frames)
			continue
		}
		if tc.nack != "" && !strings.Contains(nackText(frames), tc.nack) {
			tl.Violated.Add(1)
			t.Errorf("%s: answer %v, want a Nack containing %q", tc.name, frames, tc.nack)
		}
		for _, f := range frames {
			if f.Type == repl.TypeAck && f.Seq > 0 {
				tl.Violated.Add(1)
				t.Errorf("%s: the agent acknowledged frame %d", tc.name, f.Seq)
			}
		}
		if !e.log.waitLogged(local, tc.log) {
			tl.Violated.Add(1)
			t.Errorf("%s: no log line about the connection from %s containing %q", tc.name, local, tc.log)
		}
	}

	// Nothing of that reached the victim's data, and its real primary can
	// still pair with it.
	got, err := os.ReadFile(filepath.Join(e.dir, "volumes", "ns", "victim", "data"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, abuseSize)) {
		tl.Violated.Add(1)
		t.Error("a refused frame changed the victim's data")
	}
	st, err := e.c.Get(context.Background(), "ns", "victim")
	if err != nil {
		t.Fatal(err)
	}
	if st.Role != volume.RoleBackup || st.Epoch != 5 || st.Counters.FramesApplied != 0 {
		t.Errorf("victim after the abuse: %+v", st)
	}
	real := store.NewMem(abuseSize)
	pv, err := volume.Open(volume.Options{Name: "ns/victim", Node: "node-x", Dir: t.TempDir(), Size: abuseSize, RegionSize: abuseRegion,
		Store: real, Token: func() string { return abuseToken }, Log: funcr.New(func(string, string) {}, funcr.Options{})})
	if err != nil {
		t.Fatal(err)
	}
	defer pv.Close()
	if err := pv.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 5, Initialize: true, Mode: volume.ModeSync, PeerNode: "node-b", PeerAddress: e.replAddr}); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 20*time.Second, "victim paired with its real primary", func() (bool, string) {
		st := pv.Status()
		return st.PeerConnected, fmt.Sprintf("%+v", st)
	})
	if err := pv.WriteAt(context.Background(), data, 8192, true); err != nil {
		t.Fatalf("write through the victim's real primary: %v", err)
	}
	got, err = os.ReadFile(filepath.Join(e.dir, "volumes", "ns", "victim", "data"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[8192:8192+4096], data) {
		t.Error("the victim did not apply its real primary's sync write")
	}
	e.checkHealthy()
}

// rechecksum recomputes the CRC of one encoded frame.
func rechecksum(b []byte) []byte {
	f := repl.Frame{
		Type: repl.Type(b[5]), Flags: repl.Flags(binary.BigEndian.Uint16(b[6:])),
		Epoch: binary.BigEndian.Uint64(b[8:]), Seq: binary.BigEndian.Uint64(b[16:]),
		Offset: binary.BigEndian.Uint64(b[24:]), Length: binary.BigEndian.Uint32(b[32:]),
		Payload: b[repl.HeaderLen:],
	}
	return repl.AppendFrame(nil, &f)
}
