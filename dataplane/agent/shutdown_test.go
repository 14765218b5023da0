package agent_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestSIGTERMDrainsThenCloses: an async primary
// agent gets SIGTERM while NBD writes are in flight (its backup is stopped,
// so the replication queue is full and the last writes wait for room). The
// agent stops taking connections, lets the writes it read finish and
// answers them, closes its replicas, and exits 0. After a restart every
// region that differs from the backup is in the recovered bitmap, and a
// resync makes the replicas identical.
func TestSIGTERMDrainsThenCloses(t *testing.T) {
	a, b := newProc(t, "node-a"), newProc(t, "node-b")
	a.start()
	b.start()
	b.put(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "node-a"})
	a.put(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync, PeerNode: "node-b", PeerAddress: b.repl})
	waitInSync(t, a, b)
	r := dialNBD(t, a.nbdAddr, ns+"/"+volName)

	const (
		n     = 100
		wsize = 1 << 20 // 100 MiB in all: more than the 64 MiB replication queue
	)
	b.signal(syscall.SIGSTOP)
	stopped := true
	defer func() {
		if stopped {
			b.signal(syscall.SIGCONT)
		}
	}()
	// The writes, then a small READ: the server reads requests in order,
	// so once the READ is answered it has read every write.
	const readHandle = 1 << 20
	sendErr := make(chan error, 1)
	go func() {
		buf := make([]byte, wsize)
		for i := range n {
			for j := range buf {
				buf[j] = byte(i + j*13)
			}
			if err := r.send(cmdWrite, uint64(i), uint64(i)*wsize, wsize, buf); err != nil {
				sendErr <- fmt.Errorf("write %d: %w", i, err)
				return
			}
		}
		sendErr <- r.send(cmdRead, readHandle, 0, 4096, nil)
	}()
	var replies, failed atomic.Int64
	var readAnswered atomic.Bool
	readDone := make(chan error, 1)
	go func() {
		h := make([]byte, 16)
		for {
			_ = r.c.SetReadDeadline(time.Now().Add(60 * time.Second))
			if _, err := io.ReadFull(r.c, h); err != nil {
				readDone <- err
				return
			}
			errno := binary.BigEndian.Uint32(h[4:])
			if binary.BigEndian.Uint64(h[8:]) == readHandle {
				if errno == 0 {
					if _, err := io.ReadFull(r.c, make([]byte, 4096)); err != nil {
						readDone <- err
						return
					}
				}
				readAnswered.Store(true)
				continue
			}
			if errno != 0 {
				failed.Add(1)
			}
			replies.Add(1)
		}
	}()
	testkit.Eventually(t, 30*time.Second, "every write read by the agent", func() (bool, string) {
		return readAnswered.Load(), fmt.Sprintf("%d writes answered", replies.Load())
	})
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	inFlight := n - replies.Load()
	a.signal(syscall.SIGTERM)
	if err := a.waitExit(40 * time.Second); err != nil {
		t.Fatalf("the agent exited with %v after SIGTERM", err)
	}
	if err := <-readDone; !errors.Is(err, io.EOF) {
		t.Logf("NBD connection ended with %v", err)
	}
	t.Logf("%d of %d writes were in flight at SIGTERM", inFlight, n)
	if got := replies.Load(); got != n || failed.Load() != 0 {
		t.Fatalf("the client got %d replies (%d failed) to %d writes the agent had read; want every one answered, none failed",
			got, failed.Load(), n)
	}
	lg, _ := os.ReadFile(filepath.Join(a.dir, "agent.log"))
	for _, want := range []string{"Shutting down", "NBD server", "Replicas closed"} {
		if !strings.Contains(string(lg), want) {
			t.Errorf("the agent's log lacks %q", want)
		}
	}
	if strings.Contains(string(lg), "Closing with writes in flight") {
		t.Error("the replicas closed with writes still in flight")
	}

	// The backup takes what was on its socket and sees the stream end.
	b.signal(syscall.SIGCONT)
	stopped = false
	testkit.Eventually(t, 20*time.Second, "the backup's stream ended", func() (bool, string) {
		st := b.status()
		return !st.PeerConnected, fmt.Sprintf("%+v", st)
	}, testkit.Every(50*time.Millisecond))

	a.start()
	recovered := a.bitmapRegions()
	diff := diffRegions(t, a.dataPath(), b.dataPath())
	for _, reg := range diff {
		if !recovered[reg] {
			t.Fatalf("region %d differs from the backup but the recovered bitmap (%d regions) does not cover it", reg, len(recovered))
		}
	}
	t.Logf("%d regions differ from the backup; the recovered bitmap covers them with %d regions", len(diff), len(recovered))
	b.put(volume.Spec{Role: volume.RoleBackup, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "node-a"})
	a.put(volume.Spec{Role: volume.RolePrimary, Epoch: 2, Mode: volume.ModeAsync, PeerNode: "node-b", PeerAddress: b.repl})
	waitInSync(t, a, b)
	if d := diffRegions(t, a.dataPath(), b.dataPath()); len(d) != 0 {
		t.Fatalf("after the resync %d regions still differ: %v", len(d), d)
	}
	// Every acknowledged write is there.
	got, err := os.ReadFile(a.dataPath())
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, wsize)
	for i := range n {
		for j := range want {
			want[j] = byte(i + j*13)
		}
		if !bytes.Equal(got[i*wsize:(i+1)*wsize], want) {
			t.Fatalf("acknowledged write %d is not on the primary after the restart", i)
		}
	}
}
