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
//	8       4     format version (1)
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
	Magic      = "TNDMMETA"
	Version    = 1
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
	// UID is the VolumePair's UID, if known.
	UID string `json:"uid,omitempty"`
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
	// CreatedFresh is true when this agent created the store all-zero, so a
	// brand new pair needs no initial copy.
	CreatedFresh bool `json:"createdFresh,omitempty"`
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
	if v := binary.BigEndian.Uint32(b[8:12]); v != Version {
		return Meta{}, fmt.Errorf("format version %d, this agent reads %d: %w", v, Version, ErrVersion)
	}
	var m Meta
	dec := json.NewDecoder(bytes.NewReader(body[headerLen:]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Meta{}, corrupt("payload: %v", err)
	}
	if err := dec.Decode(new(json.RawMessage)); err != io.EOF {
		return Meta{}, corrupt("payload: data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return Meta{}, corrupt("invalid %v", err)
	}
	return m, nil
}
