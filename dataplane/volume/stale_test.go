package volume_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/stresstest"
)

// rawPrimary is a test's own primary: it dials a backup's replication
// listener, handshakes at epoch and then writes whatever frames the test
// hands it, all in one write so the backup's reader buffers them together.
type rawPrimary struct {
	t    *testing.T
	conn net.Conn
	rd   *repl.Reader
	seq  uint64
	ep   uint64
}

func dialRawPrimary(t *testing.T, addr, node string, epoch uint64, h repl.Hello) *rawPrimary {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	h.Node, h.Role, h.Epoch = node, string(volume.RolePrimary), epoch
	if h.Volume == "" {
		h.Volume, h.Size, h.RegionSize = "ns/vol", size, region
	}
	var hb bytes.Buffer
	if err := repl.WriteFrame(&hb, &repl.Frame{Type: repl.TypeHello, Epoch: epoch, Payload: h.Payload()}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(hb.Bytes()); err != nil {
		t.Fatal(err)
	}
	p := &rawPrimary{t: t, conn: c, rd: repl.NewReader(bufio.NewReader(c), 0), ep: epoch}
	for _, want := range []repl.Type{repl.TypeHelloAck, repl.TypeBitmap} {
		f, err := p.rd.Next()
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		if f.Type != want {
			t.Fatalf("handshake: got %v (%s), want %v", f.Type, f.Payload, want)
		}
	}
	return p
}

// frame returns the encoding of one frame with the next seq.
func (p *rawPrimary) frame(typ repl.Type, off uint64, payload []byte) []byte {
	p.seq++
	var b bytes.Buffer
	f := repl.Frame{Type: typ, Epoch: p.ep, Seq: p.seq, Offset: off, Payload: payload}
	if typ == repl.TypeWrite || typ == repl.TypeCopyData {
		f.Length = uint32(len(payload))
	}
	if err := repl.WriteFrame(&b, &f); err != nil {
		p.t.Fatal(err)
	}
	return b.Bytes()
}

// TestPromotedBackupIgnoresBufferedFrames: frames of the old primary that
// the backup had read but not applied when it was promoted must never be
// applied afterwards. Before the fix, the apply loop drained its buffer
// checking frames against the stream's epoch only, so a write acknowledged
// by the new primary at epoch 2 was overwritten by a buffered epoch-1 frame,
// and a buffered ResyncBegin would clear the new writer's bitmap.
func TestPromotedBackupIgnoresBufferedFrames(t *testing.T) {
	tl := stresstest.NewTally(t, "split-brain")
	tl.Trials.Add(1)
	tl.Faults.Add(1) // a promotion with frames of the old primary buffered
	mem := store.NewMem(size)
	f := store.NewFaulty(mem)
	m := &member{st: mem, logs: &syncBuf{}}
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "b", Dir: t.TempDir(), Size: size, RegionSize: region,
		Store: f, CheckpointInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	ln := serveReplication(t, v)
	t.Cleanup(func() { ln.Close(); f.Heal(); v.Close() })
	if err := v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}

	const x = 5 * region // the region both primaries write
	// The third write of the old primary to x blocks in the store until
	// released; the frames after it sit in the backup's read buffer.
	var (
		mu      sync.Mutex
		writes  int
		entered = make(chan struct{})
		release = make(chan struct{})
	)
	f.SetHook(func(op store.Op, off, n int64) error {
		if op != store.OpWrite || off != x {
			return nil
		}
		mu.Lock()
		writes++
		k := writes
		mu.Unlock()
		if k == 3 {
			close(entered)
			<-release
		}
		return nil
	})

	p := dialRawPrimary(t, ln.Addr().String(), "a", 1, repl.Hello{})
	var batch []byte
	batch = append(batch, p.frame(repl.TypeResyncBegin, 0, nil)...)
	for i := range 20 {
		batch = append(batch, p.frame(repl.TypeWrite, x, bytes.Repeat([]byte{byte(i + 1)}, 4096))...)
	}
	// A ResyncBegin after the writes would clear the new writer's bitmap.
	batch = append(batch, p.frame(repl.TypeResyncBegin, 0, nil)...)
	if _, err := p.conn.Write(batch); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the backup never applied the old primary's third write")
	}

	// The old primary is lost; the backup is promoted at epoch 2 and a
	// client write to x is acknowledged.
	promoted := make(chan error, 1)
	go func() {
		promoted <- v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, AllowPromoteInconsistent: true})
	}()
	newData := bytes.Repeat([]byte{0xEE}, 4096)
	written := make(chan error, 1)
	go func() {
		if err := <-promoted; err != nil {
			written <- err
			return
		}
		written <- v.WriteAt(context.Background(), newData, x, true)
	}()
	// Release the blocked frame once the new write is acknowledged, or
	// after a while if the promotion waits for the frame being applied.
	select {
	case err := <-written:
		close(release)
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(300 * time.Millisecond):
		close(release)
		if err := <-written; err != nil {
			t.Fatal(err)
		}
	}
	if st := v.Status(); st.OutOfSyncRegions == 0 {
		t.Fatal("the promoted writer's bitmap is empty right after its write")
	}

	// The frames the backup had buffered are applied within milliseconds
	// if at all (the old code did): watch the region for a second.
	got := make([]byte, 4096)
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := mem.ReadAt(got, x); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, newData) {
			t.Fatalf("the write acknowledged at epoch 2 was overwritten by an epoch-1 frame (region holds %#x...)", got[0])
		}
	}
	if st := v.Status(); st.OutOfSyncRegions == 0 {
		t.Fatal("a buffered ResyncBegin of the old primary cleared the new writer's bitmap")
	}
}

// TestApplyPersistsBeforeActing: a role and epoch that could not be made
// durable are not acted on. Before the fix Apply set them in memory first,
// so a member whose metadata write failed served writes as primary at an
// epoch it would forget in a restart.
func TestApplyPersistsBeforeActing(t *testing.T) {
	dir := t.TempDir()
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: dir, Size: size, RegionSize: region,
		Store: store.NewMem(size), CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if err := v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	// The metadata file can no longer be replaced: its directory is a
	// file now.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	if err := v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 7}); err == nil {
		t.Fatal("Apply succeeded without writing the metadata")
	}
	st := v.Status()
	if st.Role != volume.RoleBackup || st.Epoch != 1 || st.Writable {
		t.Fatalf("after a failed Apply the member is %s at epoch %d (writable %v), want Backup at epoch 1", st.Role, st.Epoch, st.Writable)
	}
}

// pendingAuthority answers ErrAuthorityPending until granted.
type pendingAuthority struct{ granted atomic.Bool }

func (p *pendingAuthority) Authorized(string, uint64) error {
	if p.granted.Load() {
		return nil
	}
	return fmt.Errorf("authority Lease not yet renewed by this node: %w", volume.ErrAuthorityPending)
}

// TestNewWriterWaitsForItsFirstGrant: right after a failback the requests
// the old writer forwards reach the new writer before its first authority
// renewal. They must wait for it, not fail: before, the client got EIO
// ("authority Lease not yet renewed by this node") and a file system on
// top would have gone read-only.
func TestNewWriterWaitsForItsFirstGrant(t *testing.T) {
	auth := &pendingAuthority{}
	v, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: t.TempDir(), Size: size, RegionSize: region,
		Store: store.NewMem(size), Authority: auth})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if err := v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 3, Initialize: true}); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(150*time.Millisecond, func() { auth.granted.Store(true) })
	start := time.Now()
	if err := v.WriteAt(context.Background(), []byte("held, not failed"), 0, true); err != nil {
		t.Fatalf("a write to a writer whose first grant is pending failed: %v", err)
	}
	if waited := time.Since(start); waited < 100*time.Millisecond {
		t.Fatalf("the write did not wait for the grant (%v)", waited)
	}
	// A refusal that is not pending is not waited for.
	if err := v.Apply(volume.Spec{Role: volume.RoleNone, Epoch: 4}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := v.WriteAt(context.Background(), []byte("x"), 0, false); err == nil || time.Since(start) > time.Second {
		t.Fatalf("a write to a fenced member: %v after %v", err, time.Since(start))
	}
}
