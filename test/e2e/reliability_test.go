//go:build e2e

package e2e

// Shared machinery of the cluster-level reliability suites
// (crash_test.go, partition_test.go): a minimal NBD client that can dial from
// inside a node's network namespace, a writer of numbered verifiable blocks
// that records what was acknowledged, a monitor polling both members' own
// status through the control API, and the invariant checks of docs/architecture.md.
//
// Knobs: TANDEM_STRESS_TRIALS (trials per case, default 1: the CI short
// version) and TANDEM_STRESS_SEED (randomised choices; default: time, logged).

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// ---------------------------------------------------------------- knobs

var stressTrials = stresstest.Trials

// stressSeed is the run's seed: TANDEM_STRESS_SEED, or the start time.
var stressSeed = sync.OnceValue(func() uint64 { return stresstest.Seed(uint64(time.Now().Unix())) })

// caseRand is the case's own random source: the run's seed and the case's
// name, so a case is reproducible alone (TANDEM_STRESS_SEED=<logged seed>).
func caseRand(t *testing.T) *rand.Rand {
	h := fnv.New64a()
	_, _ = h.Write([]byte(t.Name()))
	t.Logf("seed TANDEM_STRESS_SEED=%d (case %s)", stressSeed(), t.Name())
	return rand.New(rand.NewPCG(stressSeed(), h.Sum64()))
}

func jitter(r *rand.Rand, lo, hi time.Duration) time.Duration {
	return lo + time.Duration(r.Int64N(int64(hi-lo)+1))
}

// ---------------------------------------------------------------- cluster

func nodeIP(node string) string {
	i := map[string]string{"node-a": "11", "node-b": "12", "node-c": "13"}[node]
	if b, _ := os.ReadFile(filepath.Join(root, ".local", "network")); strings.TrimSpace(string(b)) == "netns" {
		return "198.18.0." + i
	}
	return "127.0.0." + i
}

func netnsCluster() bool {
	b, _ := os.ReadFile(filepath.Join(root, ".local", "network"))
	return strings.TrimSpace(string(b)) == "netns"
}

// ---------------------------------------------------------------- NBD client

// nbdClient is the least NBD a test writer needs: fixed newstyle,
// NBD_OPT_EXPORT_NAME, simple replies, WRITE (with FUA when offered), READ,
// FLUSH.
type nbdClient struct {
	c      net.Conn
	flags  uint16
	handle uint64
	node   string
}

var errNBD = errors.New("nbd error reply")

// dialNetns dials addr from inside the network namespace ns ("" = here): the
// socket is created on a thread switched into ns, and stays there.
func dialNetns(ns, addr string, timeout time.Duration) (net.Conn, error) {
	if ns == "" {
		return net.DialTimeout("tcp", addr, timeout)
	}
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// The thread goes back to its own namespace before it is
		// unlocked. If that fails it stays locked: a locked goroutine's
		// thread dies with it (unless it is the main thread, which the
		// runtime parks), so no other goroutine runs in the node's
		// namespace. The main thread must not stay there: local-cluster.sh
		// down kills every process it finds in a node's namespace.
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- res{nil, err}
			return
		}
		defer orig.Close()
		f, err := os.Open("/var/run/netns/" + ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		c, err := net.DialTimeout("tcp", addr, timeout)
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- res{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func nbdDial(netns, node, addr, export string, timeout time.Duration) (*nbdClient, error) {
	c, err := dialNetns(netns, addr, timeout)
	if err != nil {
		return nil, err
	}
	n := &nbdClient{c: c, node: node}
	if err := n.handshake(export, timeout); err != nil {
		c.Close()
		return nil, err
	}
	return n, nil
}

func (n *nbdClient) handshake(export string, timeout time.Duration) error {
	_ = n.c.SetDeadline(time.Now().Add(timeout))
	var h [18]byte
	if _, err := io.ReadFull(n.c, h[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(h[0:]) != 0x4e42444d41474943 || binary.BigEndian.Uint64(h[8:]) != 0x49484156454F5054 {
		return fmt.Errorf("not an NBD newstyle server")
	}
	sflags := binary.BigEndian.Uint16(h[16:])
	cflags := uint32(1)
	if sflags&2 != 0 {
		cflags |= 2
	}
	msg := binary.BigEndian.AppendUint32(nil, cflags)
	msg = binary.BigEndian.AppendUint64(msg, 0x49484156454F5054)
	msg = binary.BigEndian.AppendUint32(msg, 1) // NBD_OPT_EXPORT_NAME
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	if _, err := n.c.Write(msg); err != nil {
		return err
	}
	var r [10]byte
	if _, err := io.ReadFull(n.c, r[:]); err != nil {
		return fmt.Errorf("export %q refused: %w", export, err)
	}
	n.flags = binary.BigEndian.Uint16(r[8:])
	if cflags&2 == 0 {
		if _, err := io.ReadFull(n.c, make([]byte, 124)); err != nil {
			return err
		}
	}
	return nil
}

func (n *nbdClient) do(typ, flags uint16, off uint64, data []byte, rlen uint32, timeout time.Duration) ([]byte, error) {
	_ = n.c.SetDeadline(time.Now().Add(timeout))
	n.handle++
	l := rlen
	if typ == 1 {
		l = uint32(len(data))
	}
	req := binary.BigEndian.AppendUint32(make([]byte, 0, 28+len(data)), 0x25609513)
	req = binary.BigEndian.AppendUint16(req, flags)
	req = binary.BigEndian.AppendUint16(req, typ)
	req = binary.BigEndian.AppendUint64(req, n.handle)
	req = binary.BigEndian.AppendUint64(req, off)
	req = binary.BigEndian.AppendUint32(req, l)
	req = append(req, data...)
	if _, err := n.c.Write(req); err != nil {
		return nil, err
	}
	var h [16]byte
	if _, err := io.ReadFull(n.c, h[:]); err != nil {
		return nil, err
	}
	if binary.BigEndian.Uint32(h[0:]) != 0x67446698 || binary.BigEndian.Uint64(h[8:]) != n.handle {
		return nil, fmt.Errorf("bad NBD reply header %x", h)
	}
	if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
		return nil, fmt.Errorf("%w: errno %d", errNBD, e)
	}
	if typ != 0 {
		return nil, nil
	}
	buf := make([]byte, rlen)
	_, err := io.ReadFull(n.c, buf)
	return buf, err
}

// writeDurable writes and returns once the server acknowledged it as
// durable: with FUA when offered, otherwise followed by a FLUSH.
func (n *nbdClient) writeDurable(off uint64, data []byte, timeout time.Duration) error {
	if n.flags&(1<<3) != 0 {
		_, err := n.do(1, 1, off, data, 0, timeout)
		return err
	}
	if _, err := n.do(1, 0, off, data, 0, timeout); err != nil {
		return err
	}
	if n.flags&(1<<2) != 0 {
		_, err := n.do(3, 0, 0, nil, 0, timeout)
		return err
	}
	return nil
}

func (n *nbdClient) read(off uint64, l uint32, timeout time.Duration) ([]byte, error) {
	return n.do(0, 0, off, nil, l, timeout)
}

func (n *nbdClient) Close() { _ = n.c.Close() }

// ---------------------------------------------------------------- blocks

const (
	blockSize    = 4096
	windowBlocks = 2048 // the writers' window: the first 8 MiB of the volume
	blockStride  = 37   // coprime with windowBlocks: spread, no reuse before a wrap
	blockMagic   = 0x54414e44454d5752
)

func blockOf(seq uint64) int { return int(seq * blockStride % windowBlocks) }

func makeBlock(tag, seq uint64) []byte {
	b := make([]byte, blockSize)
	binary.BigEndian.PutUint64(b[0:], blockMagic)
	binary.BigEndian.PutUint64(b[8:], tag)
	binary.BigEndian.PutUint64(b[16:], seq)
	for i := 24; i < blockSize; i++ {
		b[i] = byte(seq) ^ byte(i) ^ byte(tag)
	}
	return b
}

// parseBlock returns the sequence number a block holds, and whether it is an
// intact block of this trial (tag) at this place.
func parseBlock(b []byte, tag uint64, idx int) (uint64, bool) {
	if len(b) != blockSize || binary.BigEndian.Uint64(b[0:]) != blockMagic || binary.BigEndian.Uint64(b[8:]) != tag {
		return 0, false
	}
	seq := binary.BigEndian.Uint64(b[16:])
	if blockOf(seq) != idx {
		return seq, false
	}
	for i := 24; i < blockSize; i++ {
		if b[i] != byte(seq)^byte(i)^byte(tag) {
			return seq, false
		}
	}
	return seq, true
}

// ---------------------------------------------------------------- trial state

// ack is one acknowledged write: which member acknowledged it and when the
// request was sent and answered.
type ack struct {
	seq        uint64
	node       string
	start, end time.Time
}

// fault is one injected fault, on a node ("" for the manager or a link).
type fault struct {
	at   time.Time
	node string
	what string
}

// rig is one pair under test with its monitor; trials reuse it.
type rig struct {
	s       *story
	t       *testing.T
	mode    string
	members []string
	ctl     map[string]*agentapi.Client
	export  string

	mu         sync.Mutex
	samples    []sample // writable samples (for invariant 1)
	last       map[string]sample
	violations []string
	monStop    chan struct{}
	monDone    chan struct{}

	// per trial
	trial  int
	tag    uint64
	seq    atomic.Uint64
	acks   []ack
	faults []fault
	nfault int
}

type sample struct {
	node string
	at   time.Time
	ok   bool
	st   agentapi.Status
}

func newRig(s *story, mode string, primary, backup string) *rig {
	r := &rig{s: s, t: s.t, mode: mode, members: []string{primary, backup}, ctl: map[string]*agentapi.Client{},
		export: s.ns + "/" + s.name, last: map[string]sample{}}
	for _, n := range r.members {
		r.ctl[n] = agentapi.NewClient("http://"+net.JoinHostPort(nodeIP(n), "7400"), agentToken)
	}
	r.monStop, r.monDone = make(chan struct{}), make(chan struct{})
	go r.monitor()
	s.t.Cleanup(r.stopMonitor)
	return r
}

func (r *rig) stopMonitor() {
	select {
	case <-r.monStop:
	default:
		close(r.monStop)
		<-r.monDone
	}
}

func (r *rig) other(n string) string {
	if n == r.members[0] {
		return r.members[1]
	}
	return r.members[0]
}

// violate records an invariant violation: it fails the test and is counted.
func (r *rig) violate(format string, args ...any) {
	msg := fmt.Sprintf("trial %d: ", r.trial) + fmt.Sprintf(format, args...)
	r.mu.Lock()
	r.violations = append(r.violations, msg)
	r.mu.Unlock()
	r.t.Errorf("VIOLATION %s", msg)
}

func (r *rig) nviolations() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.violations)
}

func (r *rig) addFault(node, what string) {
	r.mu.Lock()
	r.faults = append(r.faults, fault{time.Now(), node, what})
	r.nfault++
	r.mu.Unlock()
	r.t.Logf("trial %d: fault %s %s", r.trial, what, node)
}

// monitor polls both members' own status every 100 ms. It checks invariant
// 4 on the spot (an Inconsistent member never writable or primary) and keeps
// the writable samples for invariant 1.
func (r *rig) monitor() {
	defer close(r.monDone)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for i := 0; i < 1_000_000; i++ {
		for _, n := range r.members {
			ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
			st, err := r.ctl[n].Get(ctx, r.s.ns, r.s.name)
			cancel()
			sm := sample{node: n, at: time.Now(), ok: err == nil, st: st}
			r.mu.Lock()
			r.last[n] = sm
			if sm.ok && sm.st.Writable {
				r.samples = append(r.samples, sm)
			}
			r.mu.Unlock()
			if sm.ok && st.DataState == agentapi.Inconsistent && (st.Writable || st.Role == agentapi.RolePrimary) {
				r.violate("invariant 4: %s is Inconsistent but role %s writable=%v (epoch %d)", n, st.Role, st.Writable, st.Epoch)
			}
		}
		select {
		case <-r.monStop:
			return
		case <-tick.C:
		}
	}
}

// writable is the member the monitor last saw accepting writes ("" if none).
func (r *rig) writable() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	best := ""
	var at time.Time
	for n, sm := range r.last {
		if sm.ok && sm.st.Writable && sm.at.After(at) {
			best, at = n, sm.at
		}
	}
	return best
}

func (r *rig) lastSample(n string) sample {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last[n]
}

// waitWritable waits until the monitor sees node accept writes.
func (r *rig) waitWritable(node string, d time.Duration) bool {
	return testkit.Wait(d, node+" writable", func() bool {
		sm := r.lastSample(node)
		return sm.ok && sm.st.Writable
	}, testkit.Every(50*time.Millisecond)) == nil
}

// phase reads the VolumePair's phase (kubectl).
func (r *rig) phase() v1.Phase {
	out, err := kubectl(r.t, "get", "vp", r.s.name, "-n", r.s.ns, "-o", "jsonpath={.status.phase}")
	if err != nil {
		return ""
	}
	return v1.Phase(strings.TrimSpace(out))
}

func (r *rig) waitPhase(d time.Duration, want ...v1.Phase) (v1.Phase, bool) {
	deadline := time.Now().Add(d)
	var p v1.Phase
	for i := 0; i < 10000 && time.Now().Before(deadline); i++ {
		p = r.phase()
		for _, w := range want {
			if p == w {
				return p, true
			}
		}
		time.Sleep(150 * time.Millisecond)
	}
	return p, false
}

// beginTrial starts a trial: a new tag so earlier trials' blocks never count.
func (r *rig) beginTrial(i int) {
	r.mu.Lock()
	r.trial = i
	r.tag = uint64(time.Now().UnixNano())
	r.acks = nil
	r.faults = nil
	r.samples = nil
	r.mu.Unlock()
	r.seq.Store(0)
}

// ---------------------------------------------------------------- writer

// writer issues numbered 4 KiB writes, each acknowledged durably, and
// records the acknowledged ones. A "follow" writer (pin == "") writes to
// whichever member the monitor sees writable (trying both when none is); a
// pinned writer only ever talks to one member, from netns if set (a client
// on the node itself, cut off with it).
type writer struct {
	r       *rig
	pin     string
	netns   string
	paused  atomic.Bool
	stop    chan struct{}
	done    chan struct{}
	errs    int
	written int
}

func (r *rig) startWriter(pin, netns string) *writer {
	w := &writer{r: r, pin: pin, netns: netns, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

func (w *writer) run() {
	defer close(w.done)
	r := w.r
	var c *nbdClient
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	rr := 0
	for i := 0; i < 200_000; i++ {
		select {
		case <-w.stop:
			return
		default:
		}
		if w.paused.Load() {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		target := w.pin
		if target == "" {
			target = r.writable()
			if target == "" {
				rr++
				target = r.members[rr%2]
			}
		}
		if c != nil && c.node != target {
			c.Close()
			c = nil
		}
		if c == nil {
			var err error
			c, err = nbdDial(w.netns, target, net.JoinHostPort(nodeIP(target), "10809"), r.export, time.Second)
			if err != nil {
				c = nil
				w.errs++
				time.Sleep(50 * time.Millisecond)
				continue
			}
		}
		seq := r.seq.Add(1)
		start := time.Now()
		err := c.writeDurable(uint64(blockOf(seq))*blockSize, makeBlock(r.tag, seq), 2*time.Second)
		end := time.Now()
		if err != nil {
			w.errs++
			c.Close()
			c = nil
			time.Sleep(30 * time.Millisecond)
			continue
		}
		w.written++
		r.mu.Lock()
		r.acks = append(r.acks, ack{seq: seq, node: target, start: start, end: end})
		r.mu.Unlock()
		time.Sleep(4 * time.Millisecond) // ≤ ~250 writes/s: a bounded diff
	}
}

func (w *writer) halt() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}

// ---------------------------------------------------------------- checks

// checkOneWriter (invariant 1) from the monitor's samples: no epoch is
// writable on two members, and no member is seen writable at epoch e both
// before and after the other member was seen writable (that is, both
// accepted writes at the same time).
func (r *rig) checkOneWriter() {
	r.mu.Lock()
	ss := append([]sample(nil), r.samples...)
	r.mu.Unlock()
	sort.Slice(ss, func(i, j int) bool { return ss[i].at.Before(ss[j].at) })
	holder := map[uint64]string{}
	reported := 0
	for i, a := range ss {
		if h, ok := holder[a.st.Epoch]; ok && h != a.node && reported < 3 {
			r.violate("invariant 1: epoch %d writable on %s and on %s", a.st.Epoch, h, a.node)
			reported++
		}
		holder[a.st.Epoch] = a.node
		// a (node N, epoch e) ... b (other) ... c (N, e)
		for j := i + 1; j < len(ss) && reported < 3; j++ {
			b := ss[j]
			if b.node == a.node {
				continue
			}
			for k := j + 1; k < len(ss); k++ {
				c := ss[k]
				if c.node == a.node && c.st.Epoch == a.st.Epoch {
					r.violate("invariant 1: %s writable at epoch %d at %s and %s, %s writable at epoch %d in between (%s)",
						a.node, a.st.Epoch, a.at.Format("15:04:05.000"), c.at.Format("15:04:05.000"), b.node, b.st.Epoch, b.at.Format("15:04:05.000"))
					reported++
					break
				}
			}
			break
		}
	}
}

// checkAckHandovers (invariant 1 from the clients' side, as story 5): in a
// trial with at most one authority handover expected, acknowledgements by
// the two members must not interleave: once the new writer acknowledged a
// write, the old one acknowledges nothing more.
func (r *rig) checkAckHandovers(maxHandovers int) (handovers int) {
	r.mu.Lock()
	as := append([]ack(nil), r.acks...)
	r.mu.Unlock()
	sort.Slice(as, func(i, j int) bool { return as[i].end.Before(as[j].end) })
	for i := 1; i < len(as); i++ {
		if as[i].node != as[i-1].node {
			handovers++
			r.t.Logf("trial %d: writer handover %s → %s: last ack by %s at %s, first by %s at %s", r.trial, as[i-1].node, as[i].node,
				as[i-1].node, as[i-1].end.Format("15:04:05.000"), as[i].node, as[i].end.Format("15:04:05.000"))
		}
	}
	if handovers > maxHandovers {
		r.violate("invariant 1 (split brain): acknowledgements switched members %d times (at most %d expected): both acknowledged writes in overlapping time", handovers, maxHandovers)
	}
	return handovers
}

// lossAllowed: in Async, a write a member acknowledged before it was faulted
// (killed, partitioned) may be lost if the other member then took over.
func (r *rig) lossAllowed(a ack) bool {
	if r.mode != "Async" {
		return false
	}
	for _, f := range r.faults {
		if f.node != a.node || !f.at.After(a.end) {
			continue
		}
		for _, b := range r.acks {
			if b.node != a.node && b.end.After(f.at) {
				return true
			}
		}
	}
	return false
}

// checkAcked (invariant 2) reads the writers' window back from the writer
// member: every block must hold its last acknowledged write or a later
// (unacknowledged but possible) one of this trial. In Sync every loss is a
// violation; in Async only writes a faulted member acknowledged before a
// failover may be lost.
func (r *rig) checkAcked(writerNode string) {
	r.mu.Lock()
	as := append([]ack(nil), r.acks...)
	r.mu.Unlock()
	if len(as) == 0 {
		r.violate("no write was acknowledged in the whole trial (the writer never ran)")
		return
	}
	latest := map[int]ack{}
	for _, a := range as {
		idx := blockOf(a.seq)
		if a.seq > latest[idx].seq {
			latest[idx] = a
		}
	}
	var data []byte
	var err error
	for attempt := 0; attempt < 20; attempt++ {
		data, err = r.readWindow(writerNode)
		if err == nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil {
		r.violate("cannot read back from the writer %s: %v", writerNode, err)
		return
	}
	lost, allowed := 0, 0
	var examples []string
	for idx, a := range latest {
		got, ok := parseBlock(data[idx*blockSize:(idx+1)*blockSize], r.tag, idx)
		if ok && got >= a.seq {
			continue
		}
		if r.lossAllowed(a) {
			allowed++
			continue
		}
		lost++
		if len(examples) < 5 {
			examples = append(examples, fmt.Sprintf("seq %d (acked by %s at %s) block %d holds seq %d intact=%v",
				a.seq, a.node, a.end.Format("15:04:05.000"), idx, got, ok))
		}
	}
	r.t.Logf("trial %d: %d writes acknowledged, %d blocks checked on %s, %d lost as Async allows, %d lost",
		r.trial, len(as), len(latest), writerNode, allowed, lost)
	if lost > 0 {
		r.violate("invariant 2: %d acknowledged writes lost (%s mode): %s", lost, r.mode, strings.Join(examples, "; "))
	}
}

func (r *rig) readWindow(node string) ([]byte, error) {
	c, err := nbdDial("", node, net.JoinHostPort(nodeIP(node), "10809"), r.export, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	out := make([]byte, 0, windowBlocks*blockSize)
	const chunk = 256 << 10
	for off := 0; off < windowBlocks*blockSize; off += chunk {
		b, err := c.read(uint64(off), chunk, 5*time.Second)
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}

// checkBitmapsCover (invariant 3), observed when a faulted member is back
// and before the resync finished: with writes paused, every region whose
// checksums differ between the members is in one of the two dirty bitmaps
// (read first, so a bit cleared by the copy meanwhile cannot hide a
// difference: it is cleared only once the region is equal). Returns false
// when it could not observe (a member not answering).
func (r *rig) checkBitmapsCover(ws ...*writer) bool {
	for _, w := range ws {
		w.paused.Store(true)
	}
	defer func() {
		for _, w := range ws {
			w.paused.Store(false)
		}
	}()
	time.Sleep(300 * time.Millisecond) // let in-flight writes finish
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dirty := map[uint32]bool{}
	dirtyN := 0
	for _, n := range r.members {
		bm, err := r.ctl[n].Bitmap(ctx, r.s.ns, r.s.name)
		if err != nil {
			r.t.Logf("trial %d: bitmap of %s not observable: %v", r.trial, n, err)
			return false
		}
		for _, run := range bm.Runs {
			for x := run[0]; x <= run[1] && x < 1<<20; x++ {
				if !dirty[x] {
					dirtyN++
				}
				dirty[x] = true
			}
		}
	}
	sums := map[string][]string{}
	for _, n := range r.members {
		cs, err := r.checksums(ctx, n)
		if err != nil {
			r.t.Logf("trial %d: checksums of %s not observable: %v", r.trial, n, err)
			return false
		}
		sums[n] = cs
	}
	a, b := sums[r.members[0]], sums[r.members[1]]
	differ, uncovered := 0, []int{}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			differ++
			if !dirty[uint32(i)] {
				uncovered = append(uncovered, i)
			}
		}
	}
	r.t.Logf("trial %d: bitmaps mark %d regions, %d regions differ, %d differing not marked", r.trial, dirtyN, differ, len(uncovered))
	if len(uncovered) > 0 {
		r.violate("invariant 3: %d differing regions are in neither bitmap (first: %v)", len(uncovered), uncovered[:min(8, len(uncovered))])
	}
	return true
}

func (r *rig) checksums(ctx context.Context, node string) ([]string, error) {
	st, err := r.ctl[node].Get(ctx, r.s.ns, r.s.name)
	if err != nil {
		return nil, err
	}
	if st.RegionSize <= 0 {
		return nil, fmt.Errorf("region size %d", st.RegionSize)
	}
	regions := uint32(st.Size / st.RegionSize)
	var sums []string
	for first := uint32(0); first < regions; {
		n := min(regions-first, uint32(agentapi.MaxChecksumRegions))
		cs, err := r.ctl[node].Checksums(ctx, r.s.ns, r.s.name, first, n)
		if err != nil {
			return nil, err
		}
		sums = append(sums, cs.Sums...)
		first += n
	}
	return sums, nil
}

// checkIdentical (invariant 5): both backing files hash the same (the
// backup's durable ack trails by a few ms: a few tries).
func (r *rig) checkIdentical() {
	var sa, sb string
	for attempt := 0; attempt < 8; attempt++ {
		sa, sb = r.fileSum(r.members[0]), r.fileSum(r.members[1])
		if sa == sb && sa != "" {
			return
		}
		time.Sleep(300 * time.Millisecond)
	}
	r.violate("invariant 5: replicas differ at the end: %s=%s %s=%s", r.members[0], sa, r.members[1], sb)
}

func (r *rig) fileSum(node string) string {
	sum, err := testkit.HashFile(replicaFile(node, r.s.ns, r.s.name))
	if err != nil {
		return "error: " + err.Error()
	}
	return sum
}

// converged: the pair serves from active, both members up to date and
// connected, in one of the given phases.
func (r *rig) converged(d time.Duration, phases ...v1.Phase) (*v1.VolumePair, bool) {
	deadline := time.Now().Add(d)
	var vp *v1.VolumePair
	for i := 0; i < 10000 && time.Now().Before(deadline); i++ {
		vp = r.s.get()
		for _, p := range phases {
			if vp.Status.Phase == p && inSync(vp.Status.ActivePrimary)(vp) && r.agentsAgree(vp.Status.ActivePrimary) {
				return vp, true
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return vp, false
}

// agentsAgree reports whether the agents' own fresh reports (the monitor's
// samples) say what an in-sync status says: the VolumePair's status lags
// (a member restarted within a probe period still reads PAIR, in sync),
// and a trial must not start from a pair that is still recovering.
func (r *rig) agentsAgree(active string) bool {
	for _, n := range r.members {
		sm := r.lastSample(n)
		if !sm.ok || time.Since(sm.at) > time.Second {
			return false
		}
		st := sm.st
		if n == active {
			if !st.Writable || !st.PeerConnected || st.Copy.Running {
				return false
			}
		} else if st.Role != agentapi.RoleBackup || st.DataState != agentapi.UpToDate {
			return false
		}
	}
	return true
}

// reliabilityLine logs the line hack/stress/report collects.
func reliabilityLine(t *testing.T, suite string, trials, faults, violations int) {
	t.Log(stresstest.Line(suite, t.Name(), int64(trials), int64(faults), int64(violations)))
}
