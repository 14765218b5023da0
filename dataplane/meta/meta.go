// Package meta keeps a replica's metadata (volume, size, region size, epoch,
// role, data state, peer, identity) in one small file, "meta", in the replica's
// directory, replaced atomically.
//
// # File format
//
// All integers are big-endian.
//
//	offset  size  field
//	0       8     magic "TNDMMETA"
//	8       4     format version (2, 3 or 4; 1 is still read, see below)
//	12      4     payload length L (at most MaxPayload = 64 KiB)
//	16      L     payload: a JSON object (the Meta fields, see the json tags)
//	16+L    4     CRC32-Castagnoli of bytes [0, 16+L)
//
// The file is exactly 20+L bytes long. Decode checks, in order: the length,
// the magic, the payload length against the file length, the checksum, the
// version, then the payload, which must be a single JSON object with no
// unknown fields whose values pass Meta.Validate. Any failure but an unknown
// version wraps ErrCorrupt; an unknown version wraps ErrVersion (a newer agent
// wrote it; it is not damaged, but this agent must not interpret or rewrite
// it). A version that changes the payload's meaning, including adding fields,
// increments the version.
//
// # Payload fields
//
// The payload's keys (version 4; see Meta for each field's meaning):
//
//	volume       string  "<namespace>/<name>"
//	size         int     volume size in bytes, > 0; it only grows (online
//	                     expansion: its write is a grow's commit point, the
//	                     data file and bitmap journal may be larger before)
//	regionSize   int     dirty-bitmap region size, a power of two in [4 KiB, 64 MiB]
//	epoch        uint    highest authority epoch seen
//	role         string  "Primary", "Backup" or "None"
//	dataState    string  "UpToDate", "Outdated" or "Inconsistent"
//	peer         string  the member the replica's bitmaps track (omitted if none)
//	joined       bool    holds the data of pair pairUID (omitted if false)
//	pairUID      string  the pair whose data it holds (omitted if empty)
//	zero         bool    the store holds only zeros (omitted if false)
//	peerChanged  bool    the bitmaps do not describe the differences to peer:
//	                     the next resync with peer copies the whole volume
//	                     (omitted if false; versions 3 and 4)
//	otherPeers   [string] the further members the bitmaps track, beyond peer
//	                     (a pair of three or more; omitted if none; version 4)
//	otherPeersChanged [string] those of otherPeers the bitmaps do not
//	                     describe the differences to, as peerChanged for peer
//	                     (omitted if none; version 4)
//	updatedAt    string  RFC 3339 time, UTC, nanoseconds
//
// # Versions
//
// Version 2 added the replica's identity: pairUID, joined and zero (see
// Meta), and dropped version 1's uid and createdFresh, which nothing read. A version
// 1 file is still read: its replica was a member of its pair under the old
// agent, so it counts as joined to a pair whose UID it does not know yet
// (PairUID empty); the agent adopts the first pair UID the controller gives
// it. Its createdFresh is ignored (zero is false: nothing is assumed about
// its contents).
//
// Version 3 added peerChanged (member replacement: the peer changed, so the
// bitmaps no longer describe the differences to it). A version 2 file means
// peerChanged false, and a version 2 payload must not set it (Decode refuses
// "peerChanged":true in a version 2 file as corrupt). Write writes version 3
// only when PeerChanged is set, and version 2 otherwise: both mean the same
// then, and an agent that reads only versions 1 and 2 (a rollback) still
// reads every replica but one whose flag is set, which it refuses with its
// ErrVersion instead of reading it without the flag (and then copying only
// the bitmaps' regions to a peer they do not describe).
//
// Version 4 added otherPeers and otherPeersChanged (pairs of three or more
// members: the bitmaps track each other member). Write writes version 4
// only when one of them is set, and the oldest version that holds the rest
// otherwise; an older agent refuses a version 4 file with ErrVersion rather
// than read it as tracking one member. A version 2 or 3 payload must not set
// them; otherPeersChanged names only members of otherPeers, and no member
// is named twice (peer included).
//
// # Atomic replacement
//
// Write creates a temporary file "meta.tmp-*" in the same directory, writes
// and fsyncs it, renames it over "meta" and fsyncs the directory, so after a
// crash "meta" holds either the old or the new contents, never a mix. Read
// ignores temporary files; Write removes those a crash left behind.
package meta

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"time"
)

// Roles.
const (
	RolePrimary = "Primary"
	RoleBackup  = "Backup"
	RoleNone    = "None"
)

// Data states.
const (
	UpToDate     = "UpToDate"
	Outdated     = "Outdated"
	Inconsistent = "Inconsistent"
)

// Format constants.
const (
	Magic = "TNDMMETA"
	// Version is the newest format version, the one with every field.
	// Encode writes it only when a field it added is set (PeerChanged), and
	// version 2 otherwise (see the package comment).
	Version = 4
	// version3 is the format before otherPeers; version2 the format
	// before peerChanged; version1 the format before the replica identity
	// fields.
	version3   = 3
	version2   = 2
	version1   = 1
	MaxPayload = 64 << 10

	headerLen  = 16
	trailerLen = 4
	// MinRegionSize and MaxRegionSize bound Meta.RegionSize (a power of two).
	MinRegionSize = 4 << 10
	MaxRegionSize = 64 << 20
)

var (
	// ErrCorrupt is wrapped by every Decode and Read error caused by damaged
	// or invalid contents.
	ErrCorrupt = errors.New("corrupt replica metadata")
	// ErrVersion is wrapped when the file is intact but has a format version
	// this code does not know.
	ErrVersion = errors.New("unsupported replica metadata version")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Meta is the metadata of one replica.
type Meta struct {
	// Volume is "<namespace>/<name>" of the VolumePair.
	Volume string `json:"volume"`
	// Size is the volume size in bytes; RegionSize the dirty-bitmap region
	// size, a power of two in [MinRegionSize, MaxRegionSize]. Size need not be
	// a multiple of RegionSize (the last region is short).
	Size       int64 `json:"size"`
	RegionSize int64 `json:"regionSize"`
	// Epoch is the highest authority epoch this replica has seen.
	Epoch uint64 `json:"epoch"`
	// Role is RolePrimary, RoleBackup or RoleNone.
	Role string `json:"role"`
	// DataState is UpToDate, Outdated or Inconsistent.
	DataState string `json:"dataState"`
	// Peer is the peer node's name, if any: the member whose differences
	// from this replica the replica's bitmaps track (its agent keeps the
	// last peer it was given when a spec names none).
	Peer string `json:"peer,omitempty"`
	// Joined is true when the replica holds the data of the pair PairUID:
	// it started the pair's data as its first writer, or a copy from a
	// member that held it completed. A replica that is not joined (new, its
	// data lost, or joined to another pair) is Inconsistent for the pair
	// until a full copy completes (invariant 8, docs/architecture.md).
	Joined bool `json:"joined,omitempty"`
	// PairUID is the UID of the VolumePair whose data the replica holds
	// (when Joined). Empty for a joined replica of a version 1 file, whose
	// pair UID is not known yet.
	PairUID string `json:"pairUID,omitempty"`
	// Zero is true while the store holds only zeros: this agent created it
	// all-zero and nothing was written to it since. Two members that are
	// both all-zero are identical without a copy.
	Zero bool `json:"zero,omitempty"`
	// PeerChanged is true when the replica's bitmaps do not describe its
	// differences to Peer: the member it tracked was replaced by Peer (the
	// controller gave it another peer). The next resync with Peer copies
	// the whole volume; the flag is cleared once that copy no longer
	// depends on the bitmaps (the writer journaled every region as owed to
	// Peer, or this replica received the whole volume). False in files of
	// versions 1 and 2; set, it makes Encode write version 3.
	PeerChanged bool `json:"peerChanged,omitempty"`
	// OtherPeers are the further members whose differences from this
	// replica its bitmaps track, beyond Peer (a pair of three or more
	// members), in the order the controller gave them. Set, it makes Encode
	// write version 4.
	OtherPeers []string `json:"otherPeers,omitempty"`
	// OtherPeersChanged are those of OtherPeers whose differences the
	// bitmaps do not describe (as PeerChanged for Peer): the next resync
	// with each copies the whole volume. Set, it makes Encode write
	// version 4.
	OtherPeersChanged []string `json:"otherPeersChanged,omitempty"`
	// UpdatedAt is when the metadata was last written. Encode stores it in
	// UTC with nanoseconds.
	UpdatedAt time.Time `json:"updatedAt"`
}

// Validate reports the first invalid field.
func (m Meta) Validate() error {
	ns, name, ok := strings.Cut(m.Volume, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("volume %q: want <namespace>/<name>", m.Volume)
	}
	if m.Size <= 0 {
		return fmt.Errorf("size %d: must be positive", m.Size)
	}
	if r := m.RegionSize; r < MinRegionSize || r > MaxRegionSize || r&(r-1) != 0 {
		return fmt.Errorf("regionSize %d: must be a power of two in [%d, %d]", r, MinRegionSize, MaxRegionSize)
	}
	switch m.Role {
	case RolePrimary, RoleBackup, RoleNone:
	default:
		return fmt.Errorf("role %q: want %s, %s or %s", m.Role, RolePrimary, RoleBackup, RoleNone)
	}
	switch m.DataState {
	case UpToDate, Outdated, Inconsistent:
	default:
		return fmt.Errorf("dataState %q: want %s, %s or %s", m.DataState, UpToDate, Outdated, Inconsistent)
	}
	if len(m.OtherPeers) > 0 && m.Peer == "" {
		return fmt.Errorf("otherPeers %q without a peer", m.OtherPeers)
	}
	seen := map[string]bool{m.Peer: true}
	for _, p := range m.OtherPeers {
		if p == "" || seen[p] {
			return fmt.Errorf("otherPeers %q: empty or repeated member %q", m.OtherPeers, p)
		}
		seen[p] = true
	}
	changed := map[string]bool{}
	for _, p := range m.OtherPeersChanged {
		if p == m.Peer || !seen[p] || changed[p] {
			return fmt.Errorf("otherPeersChanged %q: %q is not one of otherPeers %q, or is repeated", m.OtherPeersChanged, p, m.OtherPeers)
		}
		changed[p] = true
	}
	return nil
}

// encodedVersion is the format version Encode writes for m: the oldest
// that can hold it.
func encodedVersion(m Meta) uint32 {
	switch {
	case len(m.OtherPeers) > 0 || len(m.OtherPeersChanged) > 0:
		return Version
	case m.PeerChanged:
		return version3
	}
	return version2
}

// Encode serializes m in the file format, as version 4 if m.OtherPeers or
// m.OtherPeersChanged is set, else as version 3 if m.PeerChanged is set,
// and as version 2 otherwise. It does not validate m (Write
// does), so it can produce bytes that Decode refuses: an invalid Meta, or a
// payload over MaxPayload. It panics only if m.UpdatedAt lies outside years
// 0..9999, which JSON cannot represent.
func Encode(m Meta) []byte {
	m.UpdatedAt = m.UpdatedAt.UTC()
	payload, err := json.Marshal(m)
	if err != nil {
		panic(fmt.Sprintf("meta: encode: %v", err))
	}
	b := make([]byte, 0, headerLen+len(payload)+trailerLen)
	b = append(b, Magic...)
	b = binary.BigEndian.AppendUint32(b, encodedVersion(m))
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	b = append(b, payload...)
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// encode is Encode for Write: it refuses what Decode would refuse.
func encode(m Meta) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("meta: invalid %w", err)
	}
	if y := m.UpdatedAt.UTC().Year(); y < 0 || y > 9999 {
		return nil, fmt.Errorf("meta: updatedAt %v outside years 0..9999", m.UpdatedAt)
	}
	b := Encode(m)
	if n := len(b) - headerLen - trailerLen; n > MaxPayload {
		return nil, fmt.Errorf("meta: payload of %d bytes exceeds %d", n, MaxPayload)
	}
	return b, nil
}

// metaV1 is the payload of a version 1 file.
type metaV1 struct {
	Volume       string    `json:"volume"`
	UID          string    `json:"uid,omitempty"`
	Size         int64     `json:"size"`
	RegionSize   int64     `json:"regionSize"`
	Epoch        uint64    `json:"epoch"`
	Role         string    `json:"role"`
	DataState    string    `json:"dataState"`
	Peer         string    `json:"peer,omitempty"`
	CreatedFresh bool      `json:"createdFresh,omitempty"`
	UpdatedAt    time.Time `json:"updatedAt"`
}

// decodeJSON decodes a payload that must be exactly one JSON object with no
// unknown fields.
func decodeJSON(payload []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return corrupt("payload: %v", err)
	}
	if err := dec.Decode(new(json.RawMessage)); err != io.EOF {
		return corrupt("payload: data after the JSON object")
	}
	return nil
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrCorrupt)
}

// Decode parses and validates an encoded Meta. Errors wrap ErrCorrupt, or
// ErrVersion for an intact file of another format version.
func Decode(b []byte) (Meta, error) {
	m, err := decode(b)
	if err != nil {
		return Meta{}, fmt.Errorf("meta: decode: %w", err)
	}
	return m, nil
}

func decode(b []byte) (Meta, error) {
	if len(b) < headerLen+trailerLen {
		return Meta{}, corrupt("%d bytes is shorter than the %d-byte minimum", len(b), headerLen+trailerLen)
	}
	if string(b[:8]) != Magic {
		return Meta{}, corrupt("bad magic %q, want %q", b[:8], Magic)
	}
	n := binary.BigEndian.Uint32(b[12:16])
	if n > MaxPayload {
		return Meta{}, corrupt("payload length %d exceeds %d", n, MaxPayload)
	}
	if want := headerLen + int(n) + trailerLen; len(b) != want {
		return Meta{}, corrupt("payload length %d implies %d bytes, have %d", n, want, len(b))
	}
	body := b[:headerLen+n]
	stored := binary.BigEndian.Uint32(b[headerLen+n:])
	if sum := crc32.Checksum(body, castagnoli); sum != stored {
		return Meta{}, corrupt("checksum %#08x, computed %#08x", stored, sum)
	}
	var m Meta
	switch v := binary.BigEndian.Uint32(b[8:12]); v {
	case Version:
		if err := decodeJSON(body[headerLen:], &m); err != nil {
			return Meta{}, err
		}
	case version3, version2:
		if err := decodeJSON(body[headerLen:], &m); err != nil {
			return Meta{}, err
		}
		if m.PeerChanged && v == version2 {
			return Meta{}, corrupt("payload: peerChanged set in a version %d file (added in version %d)", version2, version3)
		}
		if len(m.OtherPeers) > 0 || len(m.OtherPeersChanged) > 0 {
			return Meta{}, corrupt("payload: otherPeers or otherPeersChanged set in a version %d file (added in version %d)", v, Version)
		}
	case version1:
		var m1 metaV1
		if err := decodeJSON(body[headerLen:], &m1); err != nil {
			return Meta{}, err
		}
		m = Meta{Volume: m1.Volume, Size: m1.Size, RegionSize: m1.RegionSize, Epoch: m1.Epoch,
			Role: m1.Role, DataState: m1.DataState, Peer: m1.Peer, Joined: true, UpdatedAt: m1.UpdatedAt}
	default:
		return Meta{}, fmt.Errorf("format version %d, this agent reads %d to %d: %w", v, version1, Version, ErrVersion)
	}
	if err := m.Validate(); err != nil {
		return Meta{}, corrupt("invalid %v", err)
	}
	return m, nil
}
