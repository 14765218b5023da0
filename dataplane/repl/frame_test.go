package repl

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"net"
	"strings"
	"testing"
)

func data(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31) + seed
	}
	return b
}

// sample returns a valid frame of every type.
func sample() []*Frame {
	hello := Hello{Volume: "prod/db-0", Node: "node-a", Role: "Primary", Epoch: 7, Size: 1 << 30, RegionSize: 64 << 10, Token: "s3cret"}
	return []*Frame{
		{Type: TypeHello, Epoch: 7, Payload: hello.Payload()},
		{Type: TypeHelloAck, Epoch: 7},
		{Type: TypeWrite, Flags: FlagFUA | FlagDurableAck, Epoch: 7, Seq: 1, Offset: 4096, Length: 4096, Payload: data(4096, 1)},
		{Type: TypeWrite, Epoch: 7, Seq: 2, Offset: 1 << 40, Length: 1, Payload: []byte{0xEE}},
		{Type: TypeTrim, Epoch: 7, Seq: 3, Offset: 0, Length: 1 << 20},
		{Type: TypeZero, Flags: FlagFUA, Epoch: 7, Seq: 4, Offset: 8192, Length: math.MaxUint32},
		{Type: TypeFlush, Flags: FlagDurableAck, Epoch: 7, Seq: 5},
		{Type: TypeAck, Epoch: 7, Seq: 5},
		{Type: TypeNack, Epoch: 7, Seq: 6, Payload: []byte("stale epoch 6 < 7")},
		{Type: TypeBitmap, Epoch: 7, Payload: data(1000, 2)},
		{Type: TypeCopyData, Epoch: 7, Seq: 7, Offset: 65536, Length: 65536, Payload: data(65536, 3)},
		{Type: TypeCopyDone, Epoch: 7, Seq: 8},
		{Type: TypePing, Epoch: 7, Seq: 99, Payload: []byte("t=1")},
		{Type: TypePong, Epoch: 7, Seq: 99, Payload: []byte("t=1")},
		{Type: TypeHold, Epoch: math.MaxUint64, Payload: []byte(`{"timeoutMs":5000}`)},
		{Type: TypeRelease, Epoch: 8},
		{Type: TypeRoleSwitch, Epoch: 8, Payload: []byte(`{"newPrimary":"node-b"}`)},
		{Type: TypeResyncBegin, Epoch: 8, Seq: 1, Offset: 3 << 16},
		{Type: TypeFwdWrite, Flags: FlagFUA, Epoch: 8, Seq: 1, Offset: 4096, Length: 512, Payload: data(512, 4)},
		{Type: TypeFwdTrim, Epoch: 8, Seq: 2, Offset: 0, Length: 4096},
		{Type: TypeFwdZero, Epoch: 8, Seq: 3, Offset: 8192, Length: 4096},
		{Type: TypeFwdFlush, Epoch: 8, Seq: 4},
		{Type: TypeFwdRead, Epoch: 8, Seq: 5, Offset: 0, Length: 4096},
		{Type: TypeFwdReply, Epoch: 8, Seq: 5, Payload: data(4096, 5)},
		{Type: TypeFwdReply, Epoch: 8, Seq: 6, Offset: 1, Payload: []byte("EIO")},
		{Type: TypeWatermark, Epoch: 8, Offset: 12, Payload: AppendWatermark(nil, []WatermarkEntry{{Node: "node-c", Seq: 9}})},
	}
}

func equal(a, b *Frame) bool {
	return a.Type == b.Type && a.Flags == b.Flags && a.Epoch == b.Epoch && a.Seq == b.Seq &&
		a.Offset == b.Offset && a.Length == b.Length && bytes.Equal(a.Payload, b.Payload)
}

func TestRoundTrip(t *testing.T) {
	frames := sample()
	seen := map[Type]bool{}
	var appended []byte
	var written bytes.Buffer
	for _, f := range frames {
		seen[f.Type] = true
		appended = AppendFrame(appended, f)
		if err := WriteFrame(&written, f); err != nil {
			t.Fatalf("WriteFrame(%v): %v", f, err)
		}
	}
	for ty := Type(1); ty < typeEnd; ty++ {
		if !seen[ty] {
			t.Errorf("no round-trip case for %v", ty)
		}
	}
	if !bytes.Equal(appended, written.Bytes()) {
		t.Fatal("AppendFrame and WriteFrame encode differently")
	}
	r := NewReader(bytes.NewReader(appended), 0)
	for i, want := range frames {
		got, err := r.Next()
		if err != nil {
			t.Fatalf("frame %d (%v): %v", i, want, err)
		}
		if !equal(got, want) {
			t.Fatalf("frame %d: got %v, want %v", i, got, want)
		}
	}
	if f, err := r.Next(); err != io.EOF {
		t.Fatalf("after the last frame: %v, %v; want io.EOF itself", f, err)
	}
}

// TestLayout pins the header layout to the documented offsets.
func TestLayout(t *testing.T) {
	f := &Frame{Type: TypeWrite, Flags: FlagFUA | FlagDurableAck, Epoch: 0x0102030405060708, Seq: 0x1112131415161718,
		Offset: 0x2122232425262728, Length: 3, Payload: []byte("abc")}
	b := AppendFrame(nil, f)
	want := "544e4452" + "01" + "03" + "0003" + "0102030405060708" + "1112131415161718" + "2122232425262728" +
		"00000003" + "00000003"
	if got := hex.EncodeToString(b[:40]); got != want {
		t.Fatalf("header bytes 0..39\n got %s\nwant %s", got, want)
	}
	if string(b[:4]) != "TNDR" || string(b[44:]) != "abc" || len(b) != HeaderLen+3 {
		t.Fatalf("frame %x", b)
	}
	// The checksum is CRC32C of bytes 0..39 then the payload, i.e. of the
	// frame without bytes 40..43. 0xE3069283 is CRC32C("123456789").
	if got := crcOf(append(append([]byte(nil), b[:40]...), b[44:]...)); hex.EncodeToString(b[40:44]) != fmt.Sprintf("%08x", got) {
		t.Fatalf("checksum field %x, want %08x", b[40:44], got)
	}
	if crcOf([]byte("123456789")) != 0xE3069283 {
		t.Fatal("not CRC32-Castagnoli")
	}
}

func crcOf(b []byte) uint32 { return crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)) }

func TestTypeAndFlagStrings(t *testing.T) {
	names := map[string]bool{}
	for ty := Type(1); ty < typeEnd; ty++ {
		s := ty.String()
		if s == "" || strings.HasPrefix(s, "Type(") || names[s] {
			t.Errorf("Type %d has name %q", ty, s)
		}
		names[s] = true
	}
	for _, tc := range []struct {
		s    fmt.Stringer
		want string
	}{
		{TypeWrite, "Write"}, {TypeRoleSwitch, "RoleSwitch"}, {Type(0), "Type(0)"}, {Type(17), "ResyncBegin"}, {Type(24), "Watermark"}, {Type(25), "Type(25)"},
		{Flags(0), "0"}, {FlagFUA, "FUA"}, {FlagFUA | FlagDurableAck, "FUA|DurableAck"}, {Flags(0x8001), "FUA|0x8000"},
		{FlagHeaderChecksum | FlagFUA, "FUA|HeaderChecksum"},
		{&Frame{Type: TypeTrim, Epoch: 2, Seq: 3, Offset: 4, Length: 5}, "Trim{epoch=2 seq=3 offset=4 length=5 payload=0B flags=0}"},
	} {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name string
		f    Frame
		want error
	}{
		{"type 0", Frame{Type: 0}, ErrMalformed},
		{"type past the last", Frame{Type: typeEnd}, ErrMalformed},
		{"type 255", Frame{Type: 255}, ErrMalformed},
		{"undefined flag", Frame{Type: TypeFlush, Flags: 1 << 3}, ErrMalformed},
		{"HeaderChecksum on a Flush", Frame{Type: TypeFlush, Flags: FlagHeaderChecksum}, ErrMalformed},
		{"HeaderChecksum on a FwdWrite", Frame{Type: TypeFwdWrite, Flags: FlagHeaderChecksum, Length: 1, Payload: []byte{1}}, ErrMalformed},
		{"HeaderChecksum on a Bitmap", Frame{Type: TypeBitmap, Flags: FlagHeaderChecksum, Payload: []byte{1}}, ErrMalformed},
		{"top flag", Frame{Type: TypeAck, Flags: 1 << 15}, ErrMalformed},
		{"Hello without payload", Frame{Type: TypeHello}, ErrMalformed},
		{"empty Write", Frame{Type: TypeWrite, Length: 0}, ErrMalformed},
		{"Write length mismatch", Frame{Type: TypeWrite, Length: 4096, Payload: data(4095, 0)}, ErrMalformed},
		{"CopyData length mismatch", Frame{Type: TypeCopyData, Length: 1, Payload: data(2, 0)}, ErrMalformed},
		{"Trim with payload", Frame{Type: TypeTrim, Length: 1, Payload: []byte{0}}, ErrMalformed},
		{"Trim of nothing", Frame{Type: TypeTrim}, ErrMalformed},
		{"Zero of nothing", Frame{Type: TypeZero}, ErrMalformed},
		{"Zero past 2^63", Frame{Type: TypeZero, Offset: math.MaxInt64, Length: 1}, ErrMalformed},
		{"Write at 2^63", Frame{Type: TypeWrite, Offset: 1 << 63, Length: 1, Payload: []byte{1}}, ErrMalformed},
		{"payload over MaxPayload", Frame{Type: TypeBitmap, Payload: make([]byte, MaxPayload+1)}, ErrTooLarge},
		{"ok: Write ending at 2^63-1", Frame{Type: TypeWrite, Offset: math.MaxInt64 - 1, Length: 1, Payload: []byte{1}}, nil},
		{"ok: payload of MaxPayload", Frame{Type: TypeBitmap, Payload: make([]byte, MaxPayload)}, nil},
		{"ok: Ack with flags", Frame{Type: TypeAck, Flags: FlagDurableAck}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.f.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Validate = %v, want %v", err, tc.want)
			}
			// WriteFrame refuses it without writing anything.
			var buf bytes.Buffer
			if err := WriteFrame(&buf, &tc.f); !errors.Is(err, tc.want) || buf.Len() != 0 {
				t.Fatalf("WriteFrame = %v after writing %d bytes", err, buf.Len())
			}
			// A Reader refuses it when a buggy or hostile peer sends it.
			if len(tc.f.Payload) <= MaxPayload {
				r := NewReader(bytes.NewReader(AppendFrame(nil, &tc.f)), 0)
				if _, err := r.Next(); !errors.Is(err, tc.want) {
					t.Fatalf("Next = %v, want %v", err, tc.want)
				}
			}
		})
	}
}

// sentinels are the errors a damaged stream may produce.
var sentinels = []error{ErrBadMagic, ErrVersion, ErrChecksum, ErrTooLarge, ErrMalformed, io.ErrUnexpectedEOF}

func isKnown(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// TestEveryBitFlipDetected flips each bit of each sample frame, followed by a
// valid frame (so a shortened payload length still has bytes to read): Next
// must fail with a known error and never return a frame.
func TestEveryBitFlipDetected(t *testing.T) {
	trailer := AppendFrame(nil, &Frame{Type: TypePing, Payload: data(100, 9)})
	for _, f := range sample() {
		if len(f.Payload) > 512 {
			f.Payload = f.Payload[:512]
			f.Length = 512
		}
		enc := AppendFrame(nil, f)
		stream := append(append([]byte(nil), enc...), trailer...)
		for bit := range len(enc) * 8 {
			stream[bit/8] ^= 1 << (bit % 8)
			r := NewReader(bytes.NewReader(stream), 0)
			got, err := r.Next()
			if err == nil || !isKnown(err) {
				t.Fatalf("%v: bit %d flipped: Next = %v, %v; want a known error", f, bit, got, err)
			}
			stream[bit/8] ^= 1 << (bit % 8)
		}
	}
}

func TestErrors(t *testing.T) {
	good := AppendFrame(nil, &Frame{Type: TypeWrite, Epoch: 1, Seq: 1, Length: 8, Payload: data(8, 0)})
	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name   string
		stream []byte
		max    uint32
		want   error
		msg    string
	}{
		{"bad magic", mutate(func(b []byte) []byte { copy(b, "HTTP"); return b }), 0, ErrBadMagic, "magic 0x48545450"},
		{"version", mutate(func(b []byte) []byte { b[4] = 3; return b }), 0, ErrVersion, "version 3"},
		{"version 1 type marked version 2", func() []byte {
			b := AppendFrame(nil, &Frame{Type: TypeAck, Seq: 1})
			b[4] = 2
			return reseal(b)
		}(), 0, ErrMalformed, "marked version 2"},
		{"Watermark marked version 1", func() []byte {
			b := AppendFrame(nil, &Frame{Type: TypeWatermark, Payload: AppendWatermark(nil, nil)})
			b[4] = 1
			return reseal(b)
		}(), 0, ErrMalformed, "marked version 1"},
		{"checksum", mutate(func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b }), 0, ErrChecksum, "checksum"},
		{"checksum field", mutate(func(b []byte) []byte { b[40] ^= 1; return b }), 0, ErrChecksum, "checksum"},
		{"over the reader's cap", good, 7, ErrTooLarge, "8-byte payload, limit 7"},
		{"over MaxPayload", mutate(func(b []byte) []byte { b[36] = 0xFF; return b[:HeaderLen] }), 0, ErrTooLarge, "limit 33554432"},
		{"undefined type", AppendFrame(nil, &Frame{Type: 200}), 0, ErrMalformed, "undefined type 200"},
		{"empty stream is a clean end", nil, 0, io.EOF, "EOF"},
		{"header cut", good[:10], 0, io.ErrUnexpectedEOF, "after 10 of 44 header bytes"},
		{"payload missing", good[:HeaderLen], 0, io.ErrUnexpectedEOF, "after 0 of 8 payload bytes"},
		{"payload cut", good[:HeaderLen+5], 0, io.ErrUnexpectedEOF, "after 5 of 8 payload bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// The bad frame comes second, so the context names frame 1.
			prefix := AppendFrame(nil, &Frame{Type: TypePing})
			r := NewReader(bytes.NewReader(append(prefix, tc.stream...)), tc.max)
			if _, err := r.Next(); err != nil {
				t.Fatal(err)
			}
			f, err := r.Next()
			if f != nil || !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Next = %v, %v; want %v mentioning %q", f, err, tc.want, tc.msg)
			}
			for _, s := range append(sentinels, io.EOF) {
				if s != tc.want && errors.Is(err, s) {
					t.Errorf("%v also matches %v", err, s)
				}
			}
			if tc.want == io.EOF {
				if err != io.EOF {
					t.Errorf("clean end = %#v, want io.EOF itself", err)
				}
			} else if !strings.Contains(err.Error(), "frame 1 at stream offset 44") {
				t.Errorf("%q lacks the frame's position", err)
			}
			// Errors are sticky.
			if _, err2 := r.Next(); err2 != err {
				t.Errorf("second Next = %v, want the same error", err2)
			}
		})
	}
}

// TestHalfFrames cuts a two-frame stream at every byte.
func TestHalfFrames(t *testing.T) {
	a := AppendFrame(nil, &Frame{Type: TypeWrite, Seq: 1, Length: 100, Payload: data(100, 1)})
	stream := AppendFrame(append([]byte(nil), a...), &Frame{Type: TypeAck, Seq: 1, Payload: []byte("x")})
	for cut := range len(stream) + 1 {
		r := NewReader(bytes.NewReader(stream[:cut]), 0)
		var frames int
		var err error
		for {
			if _, err = r.Next(); err != nil {
				break
			}
			frames++
		}
		wantFrames := 0
		if cut >= len(a) {
			wantFrames++
		}
		if cut == len(stream) {
			wantFrames++
		}
		boundary := cut == 0 || cut == len(a) || cut == len(stream)
		switch {
		case frames != wantFrames:
			t.Fatalf("cut at %d: %d frames, want %d", cut, frames, wantFrames)
		case boundary && err != io.EOF:
			t.Fatalf("cut at frame boundary %d: %v, want io.EOF", cut, err)
		case !boundary && (!errors.Is(err, io.ErrUnexpectedEOF) || err == io.EOF):
			t.Fatalf("cut inside a frame at %d: %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
}

type failingReader struct{ err error }

func (r failingReader) Read([]byte) (int, error) { return 0, r.err }

func TestIOErrorsPassThrough(t *testing.T) {
	boom := errors.New("connection reset")
	_, err := NewReader(failingReader{boom}, 0).Next()
	if !errors.Is(err, boom) || isKnown(err) {
		t.Fatalf("Next = %v, want the reader's error", err)
	}
	var w failingWriter
	if err := WriteFrame(&w, &Frame{Type: TypePing}); !errors.Is(err, errWrite) {
		t.Fatalf("WriteFrame = %v", err)
	}
	if err := WriteFrame(&w, &Frame{Type: TypeBitmap, Payload: make([]byte, 1<<20)}); !errors.Is(err, errWrite) {
		t.Fatalf("WriteFrame (large) = %v", err)
	}
}

var errWrite = errors.New("broken pipe")

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errWrite }

// TestWriteFrameConn sends small and large frames over TCP (the large ones
// take the vectored, writev path) and checks they arrive intact.
func TestWriteFrameConn(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("no loopback TCP: %v", err)
	}
	defer ln.Close()
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c2, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	frames := []*Frame{
		{Type: TypeWrite, Seq: 1, Length: 512, Payload: data(512, 1)},
		{Type: TypeBitmap, Seq: 2, Payload: data(4<<20, 2)},
		{Type: TypeCopyData, Seq: 3, Offset: 1 << 30, Length: smallFrame + 1, Payload: data(smallFrame+1, 3)},
		{Type: TypeFlush, Seq: 4},
	}
	errc := make(chan error, 1)
	go func() {
		defer c1.Close()
		for _, f := range frames {
			if err := WriteFrame(c1, f); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	r := NewReader(bufio.NewReader(c2), 0)
	for _, want := range frames {
		got, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		if !equal(got, want) {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after the last frame: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func TestNewReaderCap(t *testing.T) {
	for _, tc := range []struct{ max, want uint32 }{{0, MaxPayload}, {MaxPayload + 1, MaxPayload}, {math.MaxUint32, MaxPayload}, {4096, 4096}} {
		if got := NewReader(nil, tc.max).max; got != tc.want {
			t.Errorf("NewReader(_, %d) caps at %d, want %d", tc.max, got, tc.want)
		}
	}
}

// TestContinue: a Hello read unbuffered with a small limit, then the rest of
// the stream through a buffer with the full limit; errors keep counting
// frames and bytes from the start of the stream.
func TestContinue(t *testing.T) {
	hello := sample()[0]
	big := &Frame{Type: TypeWrite, Seq: 1, Length: 64 << 10, Payload: data(64<<10, 9)}
	var stream []byte
	stream = AppendFrame(stream, hello)
	stream = AppendFrame(stream, big)
	stream = append(stream, 0xde, 0xad, 0xbe, 0xef) // then garbage
	src := bytes.NewReader(stream)
	r := NewReader(src, 1024)
	f, err := r.Next()
	if err != nil || !equal(f, hello) {
		t.Fatalf("first frame: %v, %v", f, err)
	}
	if src.Len() != len(stream)-HeaderLen-len(hello.Payload) {
		t.Fatalf("reading the Hello consumed %d bytes past it", len(stream)-HeaderLen-len(hello.Payload)-src.Len())
	}
	// The small limit refuses the big frame...
	if _, err := NewReader(bytes.NewReader(AppendFrame(nil, big)), 1024).Next(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("64 KiB frame under a 1 KiB limit: %v, want ErrTooLarge", err)
	}
	// ...the continued reader takes it.
	r.Continue(bufio.NewReaderSize(src, 256<<10), 0)
	if r.max != MaxPayload {
		t.Fatalf("Continue(_, 0) caps at %d, want %d", r.max, MaxPayload)
	}
	if f, err = r.Next(); err != nil || !equal(f, big) {
		t.Fatalf("second frame: %v, %v", f, err)
	}
	_, err = r.Next()
	want := fmt.Sprintf("frame 2 at stream offset %d", 2*HeaderLen+len(hello.Payload)+len(big.Payload))
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error after the stream continued: %v, want it to say %q", err, want)
	}
}

func TestZeroAllocs(t *testing.T) {
	f := &Frame{Type: TypeWrite, Seq: 1, Length: 4096, Payload: data(4096, 1)}
	buf := make([]byte, 0, HeaderLen+4096)
	if n := testing.AllocsPerRun(100, func() { buf = AppendFrame(buf[:0], f) }); n != 0 {
		t.Errorf("AppendFrame with capacity: %v allocs", n)
	}
	r := NewReader(&loopReader{b: AppendFrame(nil, f)}, 0)
	if _, err := r.Next(); err != nil { // first call sizes the buffer
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() {
		if _, err := r.Next(); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("Reader.Next: %v allocs per frame", n)
	}
}

// TestPayloadReuse documents that a payload is only valid until the next call.
func TestPayloadReuse(t *testing.T) {
	var stream []byte
	stream = AppendFrame(stream, &Frame{Type: TypePing, Payload: []byte("first")})
	stream = AppendFrame(stream, &Frame{Type: TypePing, Payload: []byte("other")})
	r := NewReader(bytes.NewReader(stream), 0)
	f1, _ := r.Next()
	p1 := f1.Payload
	f2, err := r.Next()
	if err != nil {
		t.Fatal(err)
	}
	if f1 != f2 || string(p1) != "other" {
		t.Fatalf("expected the Reader to reuse its frame and buffer (p1 now %q)", p1)
	}
}

// loopReader returns its bytes over and over.
type loopReader struct {
	b   []byte
	off int
}

func (l *loopReader) Read(p []byte) (int, error) {
	if l.off == len(l.b) {
		l.off = 0
	}
	n := copy(p, l.b[l.off:])
	l.off += n
	return n, nil
}

func FuzzReadFrame(f *testing.F) {
	for _, fr := range sample() {
		enc := AppendFrame(nil, fr)
		f.Add(enc)
		f.Add(enc[:len(enc)/2])
		f.Add(enc[:min(len(enc), HeaderLen)])
	}
	two := AppendFrame(AppendFrame(nil, &Frame{Type: TypeAck, Seq: 9}), &Frame{Type: TypeNack, Seq: 10, Payload: []byte("no")})
	f.Add(two)
	f.Add([]byte{})
	f.Add([]byte("TNDR"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add(AppendFrame(nil, &Frame{Type: 77, Flags: 0xFFFF}))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := NewReader(bytes.NewReader(in), 1<<20)
		consumed := 0
		for {
			fr, err := r.Next()
			if err == io.EOF {
				if consumed != len(in) {
					t.Fatalf("io.EOF after %d of %d bytes", consumed, len(in))
				}
				return
			}
			if err != nil {
				if !isKnown(err) {
					t.Fatalf("unexpected error kind: %v", err)
				}
				return
			}
			if err := fr.Validate(); err != nil {
				t.Fatalf("Next returned an invalid frame: %v", err)
			}
			// Decoding is exact: the frame re-encodes to the bytes it came from.
			enc := AppendFrame(nil, fr)
			if !bytes.Equal(enc, in[consumed:consumed+len(enc)]) {
				t.Fatalf("frame %v re-encodes differently", fr)
			}
			consumed += len(enc)
		}
	})
}

func BenchmarkAppendFrame4K(b *testing.B) {
	f := &Frame{Type: TypeWrite, Epoch: 3, Seq: 1, Offset: 1 << 20, Length: 4096, Payload: data(4096, 1)}
	buf := make([]byte, 0, HeaderLen+4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendFrame(buf[:0], f)
		f.Seq++
	}
}

func BenchmarkReadFrame4K(b *testing.B) {
	enc := AppendFrame(nil, &Frame{Type: TypeWrite, Epoch: 3, Seq: 1, Offset: 1 << 20, Length: 4096, Payload: data(4096, 1)})
	r := NewReader(&loopReader{b: enc}, 0)
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Next(); err != nil {
			b.Fatal(err)
		}
	}
}

// reseal recomputes the checksum of one encoded frame after a test changed
// its header.
func reseal(b []byte) []byte {
	crc := crc32.Update(0, castagnoli, b[:40])
	crc = crc32.Update(crc, castagnoli, b[HeaderLen:])
	binary.BigEndian.PutUint32(b[40:], crc)
	return b
}

func TestWatermarkPayload(t *testing.T) {
	entries := []WatermarkEntry{{Node: "node-b", Seq: 1}, {Node: "node-c", Seq: math.MaxUint64}}
	got, err := ParseWatermark(AppendWatermark(nil, entries))
	if err != nil || len(got) != 2 || got[0] != entries[0] || got[1] != entries[1] {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if got, err := ParseWatermark(AppendWatermark(nil, nil)); err != nil || len(got) != 0 {
		t.Fatalf("no entries: %+v, %v", got, err)
	}
	good := AppendWatermark(nil, entries)
	for _, tc := range []struct {
		name string
		p    []byte
		msg  string
	}{
		{"empty", nil, "want at least 2"},
		{"too many", []byte{0xFF, 0xFF}, "at most"},
		{"missing entry", []byte{0, 1}, "missing"},
		{"empty name", append([]byte{0, 1, 0}, make([]byte, 8)...), "length 0"},
		{"cut", good[:len(good)-1], "bytes left"},
		{"trailing", append(append([]byte(nil), good...), 0), "after the last entry"},
		{"twice", AppendWatermark(nil, []WatermarkEntry{{Node: "a"}, {Node: "a"}}), "named twice"},
	} {
		if _, err := ParseWatermark(tc.p); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v; want ErrMalformed mentioning %q", tc.name, err, tc.msg)
		}
	}
}

func FuzzParseWatermark(f *testing.F) {
	f.Add(AppendWatermark(nil, []WatermarkEntry{{Node: "node-b", Seq: 1}, {Node: "node-c", Seq: 2}}))
	f.Add([]byte{0, 0})
	f.Add([]byte{0, 1, 3, 'a'})
	f.Fuzz(func(t *testing.T, p []byte) {
		es, err := ParseWatermark(p)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not ErrMalformed: %v", err)
			}
			return
		}
		// Decoding is exact: the entries re-encode to the same bytes.
		if !bytes.Equal(AppendWatermark(nil, es), p) {
			t.Fatalf("entries %+v re-encode differently", es)
		}
	})
}

// TestHeaderChecksum: a data frame sent with FlagHeaderChecksum round-trips,
// any damage to its header is still detected, its payload is not covered
// (TCP's checksum guards it), and a Reader that requires payload checksums
// refuses it.
func TestHeaderChecksum(t *testing.T) {
	for _, f := range []*Frame{
		{Type: TypeWrite, Flags: FlagHeaderChecksum | FlagFUA, Epoch: 3, Seq: 9, Offset: 8192, Length: 4096, Payload: data(4096, 7)},
		{Type: TypeCopyData, Flags: FlagHeaderChecksum, Epoch: 3, Seq: 10, Offset: 1 << 20, Length: 200 << 10, Payload: data(200<<10, 8)},
	} {
		enc := AppendFrame(nil, f)
		full := *f
		full.Flags &^= FlagHeaderChecksum
		if crcHeaderOnly, crcFull := enc[40:44], AppendFrame(nil, &full)[40:44]; bytes.Equal(crcHeaderOnly, crcFull) {
			t.Fatalf("%v: same checksum with and without the flag", f)
		}
		got, err := NewReader(bytes.NewReader(enc), 0).Next()
		if err != nil || !equal(got, f) {
			t.Fatalf("%v: round trip = %v, %v", f, got, err)
		}
		var w bytes.Buffer
		if err := WriteFrame(&w, f); err != nil || !bytes.Equal(w.Bytes(), enc) {
			t.Fatalf("%v: WriteFrame = %v, encoding differs from AppendFrame", f, err)
		}
		for bit := range HeaderLen * 8 {
			enc[bit/8] ^= 1 << (bit % 8)
			if got, err := NewReader(bytes.NewReader(append(enc, AppendFrame(nil, &Frame{Type: TypePing})...)), 0).Next(); err == nil || !isKnown(err) {
				t.Fatalf("%v: header bit %d flipped: Next = %v, %v", f, bit, got, err)
			}
			enc[bit/8] ^= 1 << (bit % 8)
		}
		enc[HeaderLen+5] ^= 0x10
		if got, err := NewReader(bytes.NewReader(enc), 0).Next(); err != nil || got.Payload[5] != f.Payload[5]^0x10 {
			t.Fatalf("%v: a payload bit flipped under a header-only checksum: Next = %v, %v; want the frame as sent", f, got, err)
		}
		enc[HeaderLen+5] ^= 0x10
		r := NewReader(bytes.NewReader(append(AppendFrame(nil, &full), enc...)), 0)
		r.RequirePayloadChecksum(true)
		if got, err := r.Next(); err != nil || !equal(got, &full) {
			t.Fatalf("%v: with payload checksum, required: Next = %v, %v", f, got, err)
		}
		if got, err := r.Next(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%v: without payload checksum, required: Next = %v, %v; want ErrMalformed", f, got, err)
		}
	}
}

func TestHeaderChecksumAgreed(t *testing.T) {
	for _, tc := range []struct {
		ours, theirs string
		want         bool
	}{
		{ChecksumHeader, ChecksumHeader, true},
		{ChecksumHeader, ChecksumPayload, false},
		{ChecksumPayload, ChecksumHeader, false},
		{ChecksumPayload, ChecksumPayload, false},
		{ChecksumHeader, "", false}, // an agent older than the negotiation
		{"", ChecksumHeader, false},
		{ChecksumHeader, "xxhash", false},
	} {
		if got := HeaderChecksumAgreed(tc.ours, tc.theirs); got != tc.want {
			t.Errorf("HeaderChecksumAgreed(%q, %q) = %v, want %v", tc.ours, tc.theirs, got, tc.want)
		}
	}
	h := Hello{Volume: "ns/v", Node: "a", Size: 1, RegionSize: 1, Checksum: ChecksumHeader}
	if got, err := ParseHello(h.Payload()); err != nil || got.Checksum != ChecksumHeader {
		t.Fatalf("ParseHello = %+v, %v", got, err)
	}
	if got, err := ParseHello([]byte(`{"volume":"ns/v","node":"a","size":1,"regionSize":1}`)); err != nil || got.Checksum != "" {
		t.Fatalf("a Hello of an older agent: ParseHello = %+v, %v; want no checksum scope", got, err)
	}
}
