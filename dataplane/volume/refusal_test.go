package volume_test

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// lateReadConn delivers what it reads late while slow is set: a receiver
// goroutine that is scheduled after the sender (one CPU, a loaded machine).
type lateReadConn struct {
	net.Conn
	slow *atomic.Bool
}

func (c lateReadConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.slow.Load() {
		time.Sleep(30 * time.Millisecond)
	}
	return n, err
}

// TestPrimaryLogsBackupRefusal: a backup whose disk fails refuses the frame
// with a Nack giving its reason and closes the stream; the close resets the
// connection, so the primary's sender can fail ("connection reset by peer")
// before its receiver has read the Nack. The primary must still log the
// backup's reason for the link going down, not the reset. This is why
// TestDiskFaultBackupApply failed under load ("the primary's log does not
// give the backup's reason"): with -test.cpu=1 and two busy loops it failed
// in 29 of 30 runs.
func TestPrimaryLogsBackupRefusal(t *testing.T) {
	b := newFaultyMemberN(t, "b")
	if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
		t.Fatal(err)
	}
	var slow atomic.Bool
	plog := &syncBuf{}
	pst := store.NewMem(size)
	p, err := volume.Open(volume.Options{Name: "ns/vol", Node: "a", Dir: t.TempDir(), Size: size, RegionSize: region,
		Store: pst, CheckpointInterval: 100 * time.Millisecond,
		Log: funcr.New(func(prefix, args string) { plog.add(prefix + " " + args) }, funcr.Options{}),
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			return lateReadConn{Conn: c, slow: &slow}, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("---- a log ----\n%s", plog)
		}
	})
	if err := p.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "link up", func() bool { return p.Status().PeerConnected })

	slow.Store(true)
	b.f.FailWrites()
	linkDown := func() string {
		for _, l := range strings.Split(plog.String(), "\n") {
			if strings.Contains(l, "Replication link down") {
				return l
			}
		}
		return ""
	}
	buf := make([]byte, 4096)
	for deadline := time.Now().Add(10 * time.Second); linkDown() == ""; {
		if time.Now().After(deadline) {
			t.Fatal("the link never went down while the backup's disk failed")
		}
		if err := p.WriteAt(context.Background(), buf, 0, false); err != nil {
			t.Fatal(err)
		}
	}
	if l := linkDown(); !strings.Contains(l, "input/output error") || !strings.Contains(l, "peer refused frame") {
		t.Fatalf("the primary logged the link going down without the backup's reason (input/output error):\n%s", l)
	}
}
