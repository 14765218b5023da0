package volume_test

import (
	"context"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/repl"
	"github.com/tandem-storage/tandem/dataplane/store"
	"github.com/tandem-storage/tandem/dataplane/volume"
)

// teeConn copies what the primary sends into a pipe a repl.Reader decodes.
type teeConn struct {
	net.Conn
	w *io.PipeWriter
}

func (c teeConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	_, _ = c.w.Write(p[:n])
	return n, err
}

func (c teeConn) Close() error {
	c.w.Close()
	return c.Conn.Close()
}

// dataFrames counts the data frames a primary sent, with and without a
// payload checksum.
type dataFrames struct {
	mu                 sync.Mutex
	headerOnly, full   int
	writes, copies     int
	malformedOrDamaged error
}

func (d *dataFrames) read(r io.Reader) {
	rd := repl.NewReader(r, 0)
	for {
		f, err := rd.Next()
		if err != nil {
			if err != io.EOF && err != io.ErrClosedPipe {
				d.mu.Lock()
				d.malformedOrDamaged = err
				d.mu.Unlock()
			}
			io.Copy(io.Discard, r)
			return
		}
		if f.Type != repl.TypeWrite && f.Type != repl.TypeCopyData {
			continue
		}
		d.mu.Lock()
		if f.Flags&repl.FlagHeaderChecksum != 0 {
			d.headerOnly++
		} else {
			d.full++
		}
		if f.Type == repl.TypeWrite {
			d.writes++
		} else {
			d.copies++
		}
		d.mu.Unlock()
	}
}

func openChecksumMember(t *testing.T, node string, wants bool, dial volume.DialFunc) *member {
	t.Helper()
	return openMemberWith(t, node, t.TempDir(), store.NewMem(size), func(o *volume.Options) {
		o.PayloadChecksums, o.Dial = wants, dial
	})
}

// TestPayloadChecksumNegotiated: the data frames (client writes and the
// resync's copies) go without a payload checksum only when neither member
// asks for one (Options.PayloadChecksums); either one asking gets them on
// every data frame. Both ways the backup ends up with the same bytes.
func TestPayloadChecksumNegotiated(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		primaryWants, backWant bool
	}{
		{"neither asks", false, false},
		{"the primary asks", true, false},
		{"the backup asks", false, true},
		{"both ask", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			frames := &dataFrames{}
			dial := func(ctx context.Context, addr string) (net.Conn, error) {
				var d net.Dialer
				c, err := d.DialContext(ctx, "tcp", addr)
				if err != nil {
					return nil, err
				}
				pr, pw := io.Pipe()
				go frames.read(pr)
				return teeConn{Conn: c, w: pw}, nil
			}
			p := openChecksumMember(t, "a", tc.primaryWants, dial)
			b := openChecksumMember(t, "b", tc.backWant, nil)
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}); err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			write(t, p.v, rng, 20) // before the backup: copied by the resync
			if err := b.v.Apply(volume.Spec{Role: volume.RoleBackup, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "a"}); err != nil {
				t.Fatal(err)
			}
			if err := p.v.Apply(volume.Spec{Role: volume.RolePrimary, Epoch: 1, Mode: volume.ModeAsync, PeerNode: "b", PeerAddress: b.addr}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "in sync", inSync(p, b))
			write(t, p.v, rng, 50) // streamed
			waitFor(t, "in sync after the writes", inSync(p, b))
			same(t, p, b)

			frames.mu.Lock()
			defer frames.mu.Unlock()
			if frames.malformedOrDamaged != nil {
				t.Fatalf("the primary sent a frame the reader refused: %v", frames.malformedOrDamaged)
			}
			if frames.writes < 50 || frames.copies == 0 {
				t.Fatalf("saw %d Write and %d CopyData frames, want ≥ 50 and > 0", frames.writes, frames.copies)
			}
			headerOnly := !tc.primaryWants && !tc.backWant
			if headerOnly && frames.full != 0 || !headerOnly && frames.headerOnly != 0 {
				t.Fatalf("%d data frames with a header-only checksum, %d with a payload checksum; want only the %s kind",
					frames.headerOnly, frames.full, map[bool]string{true: "header-only", false: "payload"}[headerOnly])
			}
		})
	}
}
