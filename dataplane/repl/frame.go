// Package repl is the wire format of the replication link: the frames a
// primary and its backup exchange over their one TCP stream. It encodes,
// decodes and checks frames; what the frames mean (handshake, ordering, acks,
// resync) is the link's business, built on top.
//
// # Frame
//
// A frame is a fixed 44-byte header followed by the payload. Integers are
// big-endian (network byte order).
//
//	offset size field
//	0      4    magic 0x544E4452 ("TNDR")
//	4      1    version (1; 2 for the types version 2 added)
//	5      1    type
//	6      2    flags
//	8      8    epoch
//	16     8    seq
//	24     8    offset   (byte offset in the volume, or type-specific)
//	32     4    length   (type-specific: bytes affected, e.g. a TRIM's length)
//	36     4    payload length N (at most MaxPayload, 32 MiB)
//	40     4    CRC32-Castagnoli of header bytes 0..39 followed by the payload
//	            (of header bytes 0..39 only with flag HeaderChecksum)
//	44     N    payload
//
// Every frame carries the sender's authority epoch; the link refuses frames
// of a lower epoch than its own (invariant 1, docs/architecture.md). This package only carries it.
//
// # Types
//
// The structural rules in the last column are enforced by Frame.Validate,
// WriteFrame and Reader.Next; the rest is the conventional use.
//
//	type          seq                     offset / length     payload            rules
//	1  Hello      0                       -                   JSON Hello         payload required
//	2  HelloAck   0                       -                   optional JSON
//	3  Write      write order             volume range        the data           length = N > 0
//	4  Trim       write order             volume range        -                  N = 0, length > 0
//	5  Zero       write order             volume range        -                  N = 0, length > 0
//	6  Flush      write order             -                   -
//	7  Ack        highest seq applied (and durable when asked), cumulative
//	8  Nack       seq refused             -                   error text
//	9  Bitmap     -                       -                   roaring bitmap (portable serialization) of the sender's dirty regions
//	10 CopyData   ordered with writes     volume range        the data           length = N > 0
//	11 CopyDone   ordered with writes     -                   -
//	12 Ping, 13 Pong                      (a Pong echoes its Ping's seq and payload)
//	14 Hold, 15 Release, 16 RoleSwitch    (failback)          JSON
//	17 ResyncBegin first frame of a stream    offset: bytes the resync will copy (0: none);
//	                                       length: ResyncUnmerged when the receiver's own diff was not merged
//	                                       into the copy (spec.resync.mergePrimaryBitmap false)
//	18 FwdWrite    request id              volume range        the data           length = N > 0
//	19 FwdTrim, 20 FwdZero  request id     volume range        -                  N = 0, length > 0
//	21 FwdFlush    request id              -                   -
//	22 FwdRead     request id              volume range        -
//	23 FwdReply    request id              offset 0: ok, 1: error, 2: re-issue   data, error text, or -
//	24 Watermark   0                       offset: a seq of this link up to which every member holds
//	                                       everything (0: none)   entries (see Watermark)   version 2 only
//
// Fwd* frames flow from an ex-writer (now the backup) to the writer: requests
// of client connections that were open when the roles switched (failback)
// are forwarded and answered with FwdReply, so no held write fails. The
// FwdReply offset is the outcome:
//
//	0  ok        the request ran; the payload is the data of a read
//	1  error     the request failed; the payload is the error text
//	2  re-issue  the writer stepped down while holding the request: it did
//	             not run, and the stream is no longer used (the receiver
//	             fails every request still waiting on it). The requests
//	             are issued again wherever the writer is now (the receiver
//	             itself if it was promoted, or over the next writer's stream)
//
// For Write, Trim, Zero and CopyData, offset+length must not exceed 2^63-1.
//
// # Flags
//
//	bit 0  FUA             the data must be durable on the receiver before it is acked
//	bit 1  DurableAck      the Ack covering this frame must mean durable, not just applied
//	bit 2  HeaderChecksum  the checksum covers the header only, not the payload
//	                       (Write and CopyData frames only; negotiated, see below)
//
// # Payload checksums
//
// The checksum always covers the header. Whether it also covers the payload
// of the data frames (Write, CopyData) is negotiated in the handshake, as
// DRBD's data-integrity-alg is configured per connection: the Hello and the
// answer to it each say Checksum "header" (this side does not ask for
// payload checksums and accepts data frames without them) or "payload" (it
// wants them). The data frames go without a payload checksum only when
// both sides said "header"; TCP's own checksum then guards the payload, as
// in DRBD's default. Every other frame, and every frame of an agent that
// says nothing (one older than the negotiation), carries the full checksum.
// A Reader made to require payload checksums (RequirePayloadChecksum)
// refuses a data frame without one.
//
// Undefined type values and flag bits are malformed (ErrMalformed): a version
// that adds any increments the version byte (HeaderChecksum is the
// exception: it is sent only to a peer that announced it in the handshake). Version 2 added Watermark (a
// writer with several backups tells each what the others hold); a frame of
// a version 1 type is still written as version 1, so a pair of two members
// speaks version 1 only and an agent of version 1 keeps working in it. A
// frame marked with another version than the one that added its type (a
// Watermark of version 1, a Write of version 2) is malformed.
//
// # Volume size
//
// The Hello carries the primary's volume size and region size. The region
// sizes must match. The sizes need not: a volume grows online, backups
// before the primary, so a backup accepts a primary of its size or smaller
// (the primary's writes all fall inside it) and refuses a larger one with
// a Nack naming both sizes ("size mismatch: ... the backup must grow
// first"); the primary's link retries like after any refusal, and the
// writes past the backup's end stay in the primary's dirty bitmap until a
// stream is accepted. A stream accepted before the primary grew carries
// the primary's new writes past the backup's end only if the backup grew
// too: otherwise the backup Nacks the first such frame and the stream ends.
// No field was added for this; an agent older than online expansion
// refuses any size difference (as a geometry mismatch), which is transient
// as well once both have grown.
//
// # Errors
//
// Reader.Next reports a damaged or hostile stream with errors that wrap
// ErrBadMagic, ErrVersion, ErrTooLarge, ErrChecksum, ErrMalformed or
// io.ErrUnexpectedEOF (the stream ended inside a frame), each with the frame's
// index and stream offset in the message; a clean end between frames is
// io.EOF itself. Every error is final for the stream: the link closes the
// connection and logs the reason (invariant 7, docs/architecture.md).
package repl

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
)

// ResyncUnmerged in a ResyncBegin frame's length field tells the backup
// that its own diff (the regions it sent in its Bitmap) was not merged into
// the copy: those regions stay different from the primary's (the method's
// second embodiment), and the backup keeps them as unmerged regions.
const ResyncUnmerged = 1

// Wire constants.
const (
	Magic   uint32 = 0x544E4452 // "TNDR"
	Version uint8  = 2
	// version1 is the version of every type but Watermark.
	version1   uint8 = 1
	HeaderLen        = 44
	MaxPayload       = 32 << 20
)

// Errors wrapped by Reader.Next, WriteFrame and Frame.Validate.
var (
	ErrBadMagic  = errors.New("bad frame magic")
	ErrVersion   = errors.New("unsupported frame version")
	ErrChecksum  = errors.New("frame checksum mismatch")
	ErrTooLarge  = errors.New("frame payload too large")
	ErrMalformed = errors.New("malformed frame")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Type is a frame's type.
type Type uint8

// Frame types. The values are part of the wire format.
const (
	TypeHello Type = iota + 1
	TypeHelloAck
	TypeWrite
	TypeTrim
	TypeZero
	TypeFlush
	TypeAck
	TypeNack
	TypeBitmap
	TypeCopyData
	TypeCopyDone
	TypePing
	TypePong
	TypeHold
	TypeRelease
	TypeRoleSwitch
	TypeResyncBegin
	TypeFwdWrite
	TypeFwdTrim
	TypeFwdZero
	TypeFwdFlush
	TypeFwdRead
	TypeFwdReply
	TypeWatermark
	typeEnd // one past the last type
)

var typeNames = [...]string{
	TypeHello: "Hello", TypeHelloAck: "HelloAck", TypeWrite: "Write", TypeTrim: "Trim",
	TypeZero: "Zero", TypeFlush: "Flush", TypeAck: "Ack", TypeNack: "Nack", TypeBitmap: "Bitmap",
	TypeCopyData: "CopyData", TypeCopyDone: "CopyDone", TypePing: "Ping", TypePong: "Pong",
	TypeHold: "Hold", TypeRelease: "Release", TypeRoleSwitch: "RoleSwitch",
	TypeResyncBegin: "ResyncBegin", TypeFwdWrite: "FwdWrite", TypeFwdTrim: "FwdTrim",
	TypeFwdZero: "FwdZero", TypeFwdFlush: "FwdFlush", TypeFwdRead: "FwdRead", TypeFwdReply: "FwdReply",
	TypeWatermark: "Watermark",
}

// version is the frame version a type is written with: the oldest that
// defines it.
func (t Type) version() uint8 {
	if t >= TypeWatermark {
		return Version
	}
	return version1
}

// Valid reports whether t is a defined type.
func (t Type) Valid() bool { return t > 0 && t < typeEnd }

func (t Type) String() string {
	if t.Valid() {
		return typeNames[t]
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Flags modify a frame.
type Flags uint16

// Frame flags. The values are part of the wire format.
const (
	// FlagFUA asks the receiver to make the frame's data durable before
	// acknowledging it.
	FlagFUA Flags = 1 << iota
	// FlagDurableAck asks that the Ack covering this frame mean durable on
	// the receiver, not just applied.
	FlagDurableAck
	// FlagHeaderChecksum: the frame's checksum covers its header only
	// (Write and CopyData frames of a link that negotiated it).
	FlagHeaderChecksum

	knownFlags = FlagFUA | FlagDurableAck | FlagHeaderChecksum
)

// Checksum scopes announced in the handshake (Hello.Checksum and the
// answer's): see the package documentation.
const (
	// ChecksumHeader: do not ask for payload checksums; accept data frames
	// without them.
	ChecksumHeader = "header"
	// ChecksumPayload: ask for payload checksums on every frame.
	ChecksumPayload = "payload"
)

// HeaderChecksumAgreed reports whether a link may send its data frames with
// header-only checksums: both sides announced ChecksumHeader.
func HeaderChecksumAgreed(ours, theirs string) bool {
	return ours == ChecksumHeader && theirs == ChecksumHeader
}

func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var parts []string
	if f&FlagFUA != 0 {
		parts = append(parts, "FUA")
	}
	if f&FlagDurableAck != 0 {
		parts = append(parts, "DurableAck")
	}
	if f&FlagHeaderChecksum != 0 {
		parts = append(parts, "HeaderChecksum")
	}
	if rest := f &^ knownFlags; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint16(rest)))
	}
	return strings.Join(parts, "|")
}

// Frame is one decoded or to-be-encoded frame.
type Frame struct {
	Type       Type
	Flags      Flags
	Epoch, Seq uint64
	Offset     uint64
	Length     uint32
	Payload    []byte
}

// String describes the frame for logs, without its payload.
func (f *Frame) String() string {
	return fmt.Sprintf("%v{epoch=%d seq=%d offset=%d length=%d payload=%dB flags=%v}",
		f.Type, f.Epoch, f.Seq, f.Offset, f.Length, len(f.Payload), f.Flags)
}

// Validate checks the rules every frame must follow (see the package
// documentation): a defined type, defined flags only, a payload within
// MaxPayload (else ErrTooLarge), and the type's structural rules. Errors wrap
// ErrMalformed or ErrTooLarge.
func (f *Frame) Validate() error {
	if !f.Type.Valid() {
		return fmt.Errorf("undefined type %d: %w", uint8(f.Type), ErrMalformed)
	}
	if extra := f.Flags &^ knownFlags; extra != 0 {
		return fmt.Errorf("%v frame: undefined flags %#x: %w", f.Type, uint16(extra), ErrMalformed)
	}
	if len(f.Payload) > MaxPayload {
		return fmt.Errorf("%v frame: payload of %d bytes exceeds %d: %w", f.Type, len(f.Payload), MaxPayload, ErrTooLarge)
	}
	n := len(f.Payload)
	if f.Flags&FlagHeaderChecksum != 0 && f.Type != TypeWrite && f.Type != TypeCopyData {
		return fmt.Errorf("%v frame: flag HeaderChecksum on a frame that is not Write or CopyData: %w", f.Type, ErrMalformed)
	}
	switch f.Type {
	case TypeHello:
		if n == 0 {
			return fmt.Errorf("Hello frame without payload: %w", ErrMalformed)
		}
	case TypeWrite, TypeCopyData, TypeFwdWrite:
		if n == 0 || int64(f.Length) != int64(n) {
			return fmt.Errorf("%v frame: length %d with %d bytes of data, want equal and non-zero: %w", f.Type, f.Length, n, ErrMalformed)
		}
	case TypeTrim, TypeZero, TypeFwdTrim, TypeFwdZero:
		if n != 0 || f.Length == 0 {
			return fmt.Errorf("%v frame: length %d with %d bytes of payload, want length > 0 and no payload: %w", f.Type, f.Length, n, ErrMalformed)
		}
	}
	switch f.Type {
	case TypeWrite, TypeCopyData, TypeTrim, TypeZero, TypeFwdWrite, TypeFwdTrim, TypeFwdZero, TypeFwdRead:
		if f.Offset > math.MaxInt64-uint64(f.Length) {
			return fmt.Errorf("%v frame: range [%d, +%d) overflows: %w", f.Type, f.Offset, f.Length, ErrMalformed)
		}
	}
	return nil
}

// putHeader fills h (HeaderLen bytes) for f, with the checksum over h[:40]
// and f.Payload (h[:40] only with FlagHeaderChecksum).
func putHeader(h []byte, f *Frame) {
	_ = h[HeaderLen-1]
	binary.BigEndian.PutUint32(h[0:], Magic)
	h[4] = f.Type.version()
	h[5] = byte(f.Type)
	binary.BigEndian.PutUint16(h[6:], uint16(f.Flags))
	binary.BigEndian.PutUint64(h[8:], f.Epoch)
	binary.BigEndian.PutUint64(h[16:], f.Seq)
	binary.BigEndian.PutUint64(h[24:], f.Offset)
	binary.BigEndian.PutUint32(h[32:], f.Length)
	binary.BigEndian.PutUint32(h[36:], uint32(len(f.Payload)))
	crc := crc32.Update(0, castagnoli, h[:40])
	if f.Flags&FlagHeaderChecksum == 0 {
		crc = crc32.Update(crc, castagnoli, f.Payload)
	}
	binary.BigEndian.PutUint32(h[40:], crc)
}

// AppendFrame appends f's encoding to dst and returns the extended slice. It
// does not allocate when dst has room for HeaderLen+len(f.Payload) more
// bytes. It does not validate f; a frame that fails Validate is refused by
// the receiving Reader.
func AppendFrame(dst []byte, f *Frame) []byte {
	dst = slices.Grow(dst, HeaderLen+len(f.Payload))
	start := len(dst)
	dst = dst[:start+HeaderLen]
	putHeader(dst[start:], f)
	return append(dst, f.Payload...)
}

// smallFrame is the largest payload WriteFrame copies into one buffer to
// send with one Write; larger payloads go out with the header as a vector
// (writev on a net.Conn) without being copied.
const smallFrame = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, HeaderLen+4096); return &b }}

// WriteFrame validates f and writes its encoding to w. Frames with payloads
// up to 64 KiB are written with a single Write call; concurrent callers
// sharing w must still serialize their calls.
func WriteFrame(w io.Writer, f *Frame) error {
	if err := f.Validate(); err != nil {
		return fmt.Errorf("repl: write frame %v: %w", f, err)
	}
	var err error
	if len(f.Payload) <= smallFrame {
		bp := bufPool.Get().(*[]byte)
		b := AppendFrame((*bp)[:0], f)
		_, err = w.Write(b)
		*bp = b[:0]
		bufPool.Put(bp)
	} else {
		var h [HeaderLen]byte
		putHeader(h[:], f)
		bufs := net.Buffers{h[:], f.Payload}
		_, err = bufs.WriteTo(w)
	}
	if err != nil {
		return fmt.Errorf("repl: write frame %v: %w", f, err)
	}
	return nil
}

// Reader decodes frames from a stream. It is not safe for concurrent use.
// Next makes two Read calls per frame (header, payload), so wrap a network
// connection in a bufio.Reader.
type Reader struct {
	r      io.Reader
	max    uint32
	hdr    [HeaderLen]byte
	buf    []byte
	f      Frame
	frames uint64 // frames decoded so far
	pos    int64  // stream offset of the next frame
	err    error  // sticky: the first error
	// needPayloadCRC: refuse data frames without a payload checksum.
	needPayloadCRC bool
}

// RequirePayloadChecksum makes r refuse (ErrMalformed) data frames whose
// checksum does not cover their payload: the side that asked for payload
// checksums in the handshake, or one whose peer did not agree to go
// without.
func (r *Reader) RequirePayloadChecksum(on bool) { r.needPayloadCRC = on }

// NewReader returns a Reader of r that refuses payloads larger than
// maxPayload bytes; 0 or anything above MaxPayload means MaxPayload.
func NewReader(r io.Reader, maxPayload uint32) *Reader {
	if maxPayload == 0 || maxPayload > MaxPayload {
		maxPayload = MaxPayload
	}
	return &Reader{r: r, max: maxPayload}
}

// Continue makes r read the frames that follow from src, refusing payloads
// larger than maxPayload (as NewReader), and keeps the frame count and
// stream offset its errors report. A listener reads a connection's first
// frame (the Hello) unbuffered with a small limit, so an unauthenticated
// peer cannot make it allocate much, and continues an authenticated stream
// through a large buffer with the full limit. src must not have consumed
// anything past the last frame r returned.
func (r *Reader) Continue(src io.Reader, maxPayload uint32) {
	if maxPayload == 0 || maxPayload > MaxPayload {
		maxPayload = MaxPayload
	}
	r.r, r.max = src, maxPayload
}

// Next reads, checks and returns the next frame. The Frame and its Payload
// belong to the Reader and are valid only until the next call. At a clean end
// of the stream (between frames) it returns io.EOF; other errors are
// described in the package documentation. After an error Next returns the
// same error again.
func (r *Reader) Next() (*Frame, error) {
	if r.err != nil {
		return nil, r.err
	}
	if err := r.next(); err != nil {
		if err != io.EOF {
			err = fmt.Errorf("repl: frame %d at stream offset %d: %w", r.frames, r.pos, err)
		}
		r.err = err
		return nil, err
	}
	r.frames++
	r.pos += HeaderLen + int64(len(r.f.Payload))
	return &r.f, nil
}

func (r *Reader) next() error {
	h := r.hdr[:]
	if n, err := io.ReadFull(r.r, h); err != nil {
		switch err {
		case io.EOF:
			return io.EOF
		case io.ErrUnexpectedEOF:
			return fmt.Errorf("stream ends after %d of %d header bytes: %w", n, HeaderLen, err)
		}
		return fmt.Errorf("reading header: %w", err)
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != Magic {
		return fmt.Errorf("magic %#08x, want %#08x: %w", m, Magic, ErrBadMagic)
	}
	if v := h[4]; v != version1 && v != Version {
		return fmt.Errorf("version %d, this agent speaks %d and %d: %w", v, version1, Version, ErrVersion)
	}
	if t := Type(h[5]); t.Valid() && h[4] != t.version() {
		return fmt.Errorf("%v frame marked version %d, want %d (the version that added it): %w", t, h[4], t.version(), ErrMalformed)
	}
	n := binary.BigEndian.Uint32(h[36:])
	if n > r.max {
		return fmt.Errorf("%v frame declares a %d-byte payload, limit %d: %w", Type(h[5]), n, r.max, ErrTooLarge)
	}
	if uint32(cap(r.buf)) < n {
		r.buf = make([]byte, n)
	}
	p := r.buf[:n]
	if got, err := io.ReadFull(r.r, p); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return fmt.Errorf("stream ends after %d of %d payload bytes: %w", got, n, io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("reading %d-byte payload: %w", n, err)
	}
	flags := Flags(binary.BigEndian.Uint16(h[6:]))
	crc := crc32.Update(0, castagnoli, h[:40])
	if flags&FlagHeaderChecksum == 0 {
		crc = crc32.Update(crc, castagnoli, p)
	}
	if want := binary.BigEndian.Uint32(h[40:]); crc != want {
		return fmt.Errorf("checksum %#08x, computed %#08x: %w", want, crc, ErrChecksum)
	}
	if flags&FlagHeaderChecksum != 0 && r.needPayloadCRC {
		return fmt.Errorf("%v frame without a payload checksum, which this side asked for: %w", Type(h[5]), ErrMalformed)
	}
	r.f = Frame{
		Type:    Type(h[5]),
		Flags:   flags,
		Epoch:   binary.BigEndian.Uint64(h[8:]),
		Seq:     binary.BigEndian.Uint64(h[16:]),
		Offset:  binary.BigEndian.Uint64(h[24:]),
		Length:  binary.BigEndian.Uint32(h[32:]),
		Payload: p,
	}
	return r.f.Validate()
}
