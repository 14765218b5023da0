// Package meta keeps a replica's metadata (volume, size, region size, epoch,
// role, data state, peer) in one small file, "meta", in the replica's
// directory, replaced atomically.
//
// # File format
//
// All integers are big-endian.
//
//	offset  size  field
//	0       8     magic "TNDMMETA"
//	8       4     format version (2; 1 is still read, see below)
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
// # Versions
//
// Version 2 added the replica's identity: pairUID, joined and zero (see
// Meta), and dropped version 1's uid and createdFresh, which nothing read. A version
// 1 file is still read: its replica was a member of its pair under the old
// agent, so it counts as joined to a pair whose UID it does not know yet
// (PairUID empty); the agent adopts the first pair UID the controller gives
// it. Its createdFresh is ignored (zero is false: nothing is assumed about
// its contents). Write always writes version 2.
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
	Magic   = "TNDMMETA"
	Version = 2
	// version1 is the format before the replica identity fields.
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
	// Peer is the peer node's name, if any.
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
	return nil
}

// Encode serializes m in the file format. It does not validate m (Write
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
	b = binary.BigEndian.AppendUint32(b, Version)
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
	case version1:
		var m1 metaV1
		if err := decodeJSON(body[headerLen:], &m1); err != nil {
			return Meta{}, err
		}
		m = Meta{Volume: m1.Volume, Size: m1.Size, RegionSize: m1.RegionSize, Epoch: m1.Epoch,
			Role: m1.Role, DataState: m1.DataState, Peer: m1.Peer, Joined: true, UpdatedAt: m1.UpdatedAt}
	default:
		return Meta{}, fmt.Errorf("format version %d, this agent reads %d and %d: %w", v, version1, Version, ErrVersion)
	}
	if err := m.Validate(); err != nil {
		return Meta{}, corrupt("invalid %v", err)
	}
	return m, nil
}
