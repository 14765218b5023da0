package repl

import (
	"encoding/binary"
	"fmt"
)

// A Watermark frame goes from a writer with several backups to each of
// them: for each other member, the highest seq of this link up to which
// that member durably holds every write the link carried. The backup keeps
// a dirty bitmap per other member of the regions it applied that the
// member may lack, and clears it up to that seq; promoted, it resyncs each
// of them by that bitmap instead of a full copy.
//
// # Payload
//
// Integers are big-endian.
//
//	offset size field
//	0      2    entry count K (at most MaxWatermarkEntries)
//	then K entries:
//	       1    node name length L (1..253)
//	       L    node name (UTF-8)
//	       8    seq
//
// Nothing may follow the last entry, and no node may appear twice.

// MaxWatermarkEntries bounds the entries of one Watermark frame.
const MaxWatermarkEntries = 64

// WatermarkEntry says member Node durably holds every write of this link
// up to Seq.
type WatermarkEntry struct {
	Node string
	Seq  uint64
}

// AppendWatermark appends the payload for entries to dst.
func AppendWatermark(dst []byte, entries []WatermarkEntry) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(entries)))
	for _, e := range entries {
		dst = append(dst, byte(len(e.Node)))
		dst = append(dst, e.Node...)
		dst = binary.BigEndian.AppendUint64(dst, e.Seq)
	}
	return dst
}

// ParseWatermark decodes a Watermark payload. Errors wrap ErrMalformed.
func ParseWatermark(p []byte) ([]WatermarkEntry, error) {
	bad := func(format string, args ...any) ([]WatermarkEntry, error) {
		return nil, fmt.Errorf("repl: Watermark payload: %s: %w", fmt.Sprintf(format, args...), ErrMalformed)
	}
	if len(p) < 2 {
		return bad("%d bytes, want at least 2", len(p))
	}
	k := int(binary.BigEndian.Uint16(p))
	if k > MaxWatermarkEntries {
		return bad("%d entries, at most %d", k, MaxWatermarkEntries)
	}
	p = p[2:]
	out := make([]WatermarkEntry, 0, k)
	seen := make(map[string]bool, k)
	for i := range k {
		if len(p) < 1 {
			return bad("entry %d: missing", i)
		}
		l := int(p[0])
		if l == 0 || l > 253 {
			return bad("entry %d: node name length %d, want 1..253", i, l)
		}
		if len(p) < 1+l+8 {
			return bad("entry %d: %d bytes left, want %d", i, len(p), 1+l+8)
		}
		e := WatermarkEntry{Node: string(p[1 : 1+l]), Seq: binary.BigEndian.Uint64(p[1+l:])}
		if seen[e.Node] {
			return bad("entry %d: node %q named twice", i, e.Node)
		}
		seen[e.Node] = true
		out = append(out, e)
		p = p[1+l+8:]
	}
	if len(p) != 0 {
		return bad("%d bytes after the last entry", len(p))
	}
	return out, nil
}
