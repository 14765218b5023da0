package agent_test

// NBD abuse against a running agent: raw
// TCP clients that send huge lengths, offsets past the end, unknown
// commands, half frames, bad magic, or that idle or trickle through the
// handshake, while a well-behaved client keeps writing to another volume of
// the same agent. Each abuser gets a clear error (an NBD error reply, or the
// connection closed with a logged reason), the well-behaved client never
// fails, and the attacked volume keeps its data.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/stresstest"
	"github.com/tandem-storage/tandem/internal/testkit"
)

const (
	nbdReqMagic   = 0x25609513
	nbdReplyMagic = 0x67446698
	nbdOptMagic   = 0x49484156454F5054
	cmdRead       = 0
	cmdWrite      = 1
	cmdDisc       = 2
	nbdEINVAL     = 22
	nbdENOSPC     = 28
	abuseHSLimit  = 2 * time.Second // the server's handshake timeout in this test
)

// rawNBD is a minimal NBD client speaking the fixed newstyle handshake with
// NBD_OPT_EXPORT_NAME and simple replies: enough to send what real clients
// never would.
type rawNBD struct {
	c    net.Conn
	size uint64
}

func dialNBD(t *testing.T, addr, export string) *rawNBD {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial NBD %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	greet := make([]byte, 18)
	if _, err := io.ReadFull(c, greet); err != nil {
		t.Fatalf("NBD greeting: %v", err)
	}
	// Client flags: fixed newstyle, no zeroes.
	msg := binary.BigEndian.AppendUint32(nil, 1|2)
	msg = binary.BigEndian.AppendUint64(msg, nbdOptMagic)
	msg = binary.BigEndian.AppendUint32(msg, 1) // NBD_OPT_EXPORT_NAME
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("NBD option: %v", err)
	}
	info := make([]byte, 10)
	if _, err := io.ReadFull(c, info); err != nil {
		t.Fatalf("NBD export %q refused: %v", export, err)
	}
	_ = c.SetDeadline(time.Time{})
	return &rawNBD{c: c, size: binary.BigEndian.Uint64(info)}
}

func (r *rawNBD) send(typ uint16, handle, off uint64, length uint32, payload []byte) error {
	b := binary.BigEndian.AppendUint32(nil, nbdReqMagic)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	b = append(b, payload...)
	_ = r.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := r.c.Write(b)
	return err
}

// reply reads one simple reply; data is read only when the reply succeeds
// and readLen > 0.
func (r *rawNBD) reply(readLen uint32) (handle uint64, errno uint32, data []byte, err error) {
	_ = r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	h := make([]byte, 16)
	if _, err := io.ReadFull(r.c, h); err != nil {
		return 0, 0, nil, err
	}
	if m := binary.BigEndian.Uint32(h); m != nbdReplyMagic {
		return 0, 0, nil, fmt.Errorf("reply magic %#x", m)
	}
	errno, handle = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && readLen > 0 {
		data = make([]byte, readLen)
		if _, err := io.ReadFull(r.c, data); err != nil {
			return handle, errno, nil, err
		}
	}
	return handle, errno, data, nil
}

// closedWithin reports whether the server closes c within d (reading and
// discarding anything it sends).
func closedWithin(c net.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

func TestNBDAbuse(t *testing.T) {
	tl := stresstest.NewTally(t, "bad-nbd-input")
	ag := startAgent(t, agent.Options{Config: agent.Config{Node: "node-a", Token: abuseToken}, NBDHandshakeTimeout: abuseHSLimit})
	c, addr, log := ag.c, ag.ep.NBD, ag.log
	for _, name := range []string{"healthy", "victim"} {
		// Standalone writers: no peer, the control API's word is final.
		if _, err := c.Put(context.Background(), "ns", name, agent.VolumeRequest{Size: abuseSize, RegionSize: abuseRegion,
			Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}}); err != nil {
			t.Fatalf("PUT ns/%s: %v", name, err)
		}
	}

	// The victim's known content: a pattern over its first MiB.
	pattern := make([]byte, 1<<20)
	rng := mrand.New(mrand.NewPCG(11, 12))
	for i := range pattern {
		pattern[i] = byte(rng.Uint32())
	}
	v := dialNBD(t, addr, "ns/victim")
	if v.size != abuseSize {
		t.Fatalf("victim export size %d, want %d", v.size, abuseSize)
	}
	for off := 0; off < len(pattern); off += 256 << 10 {
		if err := v.send(cmdWrite, 1, uint64(off), 256<<10, pattern[off:off+256<<10]); err != nil {
			t.Fatal(err)
		}
		if _, errno, _, err := v.reply(0); err != nil || errno != 0 {
			t.Fatalf("writing the victim's pattern: errno %d, %v", errno, err)
		}
	}

	// The well-behaved client: numbered 4 KiB writes to ns/healthy, each read
	// back, for the whole test.
	var good atomic.Int64
	stop, done := make(chan struct{}), make(chan struct{})
	h := dialNBD(t, addr, "ns/healthy")
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for i := uint64(0); i < 1_000_000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			off := (i % (abuseSize / 4096)) * 4096
			binary.BigEndian.PutUint64(buf, i)
			if err := h.send(cmdWrite, i, off, 4096, buf); err != nil {
				t.Errorf("healthy client: write %d: %v", i, err)
				return
			}
			if _, errno, _, err := h.reply(0); err != nil || errno != 0 {
				t.Errorf("healthy client: write %d: errno %d, %v", i, errno, err)
				return
			}
			if err := h.send(cmdRead, i, off, 4096, nil); err != nil {
				t.Errorf("healthy client: read %d: %v", i, err)
				return
			}
			_, errno, data, err := h.reply(4096)
			if err != nil || errno != 0 || binary.BigEndian.Uint64(data) != i {
				t.Errorf("healthy client: read %d back: errno %d, %v", i, errno, err)
				return
			}
			good.Add(1)
			time.Sleep(2 * time.Millisecond)
		}
	}()

	// Requests that get an error reply and leave the connection usable.
	type errCase struct {
		name    string
		typ     uint16
		off     uint64
		length  uint32
		payload bool
		errnos  []uint32
	}
	errCases := []errCase{
		{"read of 4 GiB", cmdRead, 0, 0xffffffff, false, []uint32{nbdEINVAL}},
		{"read past the end", cmdRead, abuseSize, 4096, false, []uint32{nbdEINVAL}},
		{"read straddling the end", cmdRead, abuseSize - 512, 4096, false, []uint32{nbdEINVAL}},
		{"read with offset+length overflowing", cmdRead, 1<<64 - 512, 4096, false, []uint32{nbdEINVAL}},
		{"write past the end", cmdWrite, abuseSize, 4096, true, []uint32{nbdEINVAL, nbdENOSPC}},
		{"write straddling the end", cmdWrite, abuseSize - 512, 4096, true, []uint32{nbdEINVAL, nbdENOSPC}},
		{"unknown command 99", 99, 0, 4096, false, []uint32{nbdEINVAL}},
	}
	// Connections the server must close, with a logged reason.
	type closeCase struct {
		name string
		do   func(t *testing.T) net.Conn
		log  string // in the log line about this connection
	}
	closeCases := []closeCase{
		{"write of 4 GiB", func(t *testing.T) net.Conn {
			r := dialNBD(t, addr, "ns/victim")
			_ = r.send(cmdWrite, 7, 0, 0xffffffff, make([]byte, 4096))
			return r.c
		}, "exceeds the maximum payload"},
		{"bad request magic", func(t *testing.T) net.Conn {
			r := dialNBD(t, addr, "ns/victim")
			_, _ = r.c.Write(bytes.Repeat([]byte{0xde, 0xad}, 14))
			return r.c
		}, "bad request magic"},
		{"half a request, then silence", func(t *testing.T) net.Conn {
			r := dialNBD(t, addr, "ns/victim")
			_, _ = r.c.Write([]byte{0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 0, 0})
			_ = r.c.(*net.TCPConn).CloseWrite()
			return r.c
		}, "reading request: unexpected EOF"},
		{"half a write payload, then EOF", func(t *testing.T) net.Conn {
			r := dialNBD(t, addr, "ns/victim")
			_ = r.send(cmdWrite, 8, 0, 65536, pattern[:1000])
			_ = r.c.(*net.TCPConn).CloseWrite()
			return r.c
		}, "payload: unexpected EOF"},
		{"unknown export", func(t *testing.T) net.Conn {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			msg := binary.BigEndian.AppendUint32(nil, 1|2)
			msg = binary.BigEndian.AppendUint64(msg, nbdOptMagic)
			msg = binary.BigEndian.AppendUint32(msg, 1)
			msg = binary.BigEndian.AppendUint32(msg, 7)
			msg = append(msg, "ns/nope"...)
			_, _ = c.Write(msg)
			return c
		}, "no volume"},
		{"idle after connecting", func(t *testing.T) net.Conn {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			return c
		}, "i/o timeout"},
		{"handshake one byte every 300 ms", func(t *testing.T) net.Conn {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				for _, b := range []byte{0, 0, 0, 3, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 1} {
					if _, err := c.Write([]byte{b}); err != nil {
						return
					}
					time.Sleep(300 * time.Millisecond)
				}
			}()
			return c
		}, "i/o timeout"},
	}

	for trial := range stresstest.Trials(1) {
		tl.Trials.Add(1)
		r := dialNBD(t, addr, "ns/victim")
		for i, ec := range errCases {
			var payload []byte
			if ec.payload {
				payload = make([]byte, ec.length)
			}
			tl.Faults.Add(1)
			if err := r.send(ec.typ, uint64(100+i), ec.off, ec.length, payload); err != nil {
				t.Fatalf("trial %d, %s: send: %v", trial, ec.name, err)
			}
			hd, errno, _, err := r.reply(0)
			if err != nil || hd != uint64(100+i) || !containsU32(ec.errnos, errno) {
				tl.Violated.Add(1)
				t.Errorf("trial %d, %s: reply handle %d errno %d (%v); want handle %d errno in %v", trial, ec.name, hd, errno, err, 100+i, ec.errnos)
				continue
			}
			// Still usable: a valid read of the pattern on the same connection.
			if err := r.send(cmdRead, 1, 4096, 4096, nil); err != nil {
				t.Fatalf("trial %d, after %s: %v", trial, ec.name, err)
			}
			if _, errno, data, err := r.reply(4096); err != nil || errno != 0 || !bytes.Equal(data, pattern[4096:8192]) {
				tl.Violated.Add(1)
				t.Errorf("trial %d, after %s: the connection is no longer usable (errno %d, %v)", trial, ec.name, errno, err)
			}
		}
		_ = r.send(cmdDisc, 0, 0, 0, nil)

		var wg sync.WaitGroup
		for _, cc := range closeCases {
			wg.Add(1)
			tl.Faults.Add(1)
			go func() {
				defer wg.Done()
				conn := cc.do(t)
				defer conn.Close()
				// Every close happens within the handshake timeout plus
				// slack, with the reason in the log (invariant 7).
				if !closedWithin(conn, abuseHSLimit+3*time.Second) {
					tl.Violated.Add(1)
					t.Errorf("trial %d, %s: the server kept the connection open", trial, cc.name)
				} else if !log.waitLogged(conn.LocalAddr().String(), cc.log) {
					tl.Violated.Add(1)
					t.Errorf("trial %d, %s: no log line about %s containing %q", trial, cc.name, conn.LocalAddr(), cc.log)
				}
			}()
		}
		wg.Wait()

		// Many idle but well-formed connections do not starve anyone.
		idle := make([]*rawNBD, 64)
		for i := range idle {
			idle[i] = dialNBD(t, addr, "ns/victim")
		}
		tl.Faults.Add(int64(len(idle)))
		before := good.Load()
		if testkit.Wait(300*time.Millisecond, "progress", func() bool { return good.Load() > before }) != nil {
			tl.Violated.Add(1)
			t.Errorf("trial %d: the well-behaved client made no progress with %d idle connections open", trial, len(idle))
		}
		for _, r := range idle {
			r.c.Close()
		}
	}

	close(stop)
	<-done
	if good.Load() == 0 {
		t.Error("the well-behaved client wrote nothing")
	}
	// The victim's data survived every abuse.
	r := dialNBD(t, addr, "ns/victim")
	if err := r.send(cmdRead, 1, 0, uint32(len(pattern)), nil); err != nil {
		t.Fatal(err)
	}
	if _, errno, data, err := r.reply(uint32(len(pattern))); err != nil || errno != 0 || !bytes.Equal(data, pattern) {
		tl.Violated.Add(1)
		t.Errorf("the victim's data changed under the abuse (errno %d, %v)", errno, err)
	}
	for _, name := range []string{"healthy", "victim"} {
		st, err := c.Get(context.Background(), "ns", name)
		if err != nil || !st.Writable {
			t.Errorf("ns/%s after the abuse: writable %v, %v", name, st.Writable, err)
		}
	}
	t.Logf("NBD abuse: %d well-behaved write+read pairs during %d trials of %d abusive requests and %d abusive connections",
		good.Load(), tl.Trials.Load(), len(errCases), len(closeCases)+64)
}

func containsU32(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
