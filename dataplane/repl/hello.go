package repl

import (
	"encoding/json"
	"fmt"
)

// Hello is the JSON payload of a Hello frame: who is speaking about which
// volume. Unknown fields are ignored, so later versions can add some.
type Hello struct {
	Volume string `json:"volume"` // "<namespace>/<name>"
	Node   string `json:"node"`
	Role   string `json:"role"`
	Epoch  uint64 `json:"epoch"`
	// Size is the sender's volume size in bytes: a backup accepts a
	// primary of its size or smaller (see Volume size in the package
	// documentation); RegionSize must match exactly.
	Size       int64 `json:"size"`
	RegionSize int64 `json:"regionSize"`
	// PairUID is the VolumePair the primary serves; a backup that belongs
	// to another pair refuses the stream.
	PairUID string `json:"pairUID,omitempty"`
	Token   string `json:"token,omitempty"`
	// Checksum is what this side asks of the data frames' checksums:
	// ChecksumHeader or ChecksumPayload; empty (an agent older than the
	// negotiation): payload checksums, and no header-only frames.
	Checksum string `json:"checksum,omitempty"`
}

// String describes h for logs; the token is never printed.
func (h Hello) String() string {
	tok := "none"
	if h.Token != "" {
		tok = "redacted"
	}
	return fmt.Sprintf("Hello{volume=%s pairUID=%s node=%s role=%s epoch=%d size=%d regionSize=%d token=%s}",
		h.Volume, h.PairUID, h.Node, h.Role, h.Epoch, h.Size, h.RegionSize, tok)
}

// Payload encodes h as a Hello frame's payload.
func (h Hello) Payload() []byte {
	b, err := json.Marshal(h)
	if err != nil {
		panic(fmt.Sprintf("repl: marshal Hello: %v", err)) // strings and integers always marshal
	}
	return b
}

// ParseHello decodes a Hello payload and checks that it names a volume and a
// node and gives a positive size and region size. Errors wrap ErrMalformed.
func ParseHello(payload []byte) (Hello, error) {
	var h Hello
	if err := json.Unmarshal(payload, &h); err != nil {
		return Hello{}, fmt.Errorf("repl: Hello payload: %v: %w", err, ErrMalformed)
	}
	switch {
	case h.Volume == "":
		return Hello{}, fmt.Errorf("repl: Hello payload: no volume: %w", ErrMalformed)
	case h.Node == "":
		return Hello{}, fmt.Errorf("repl: Hello payload: no node: %w", ErrMalformed)
	case h.Size <= 0:
		return Hello{}, fmt.Errorf("repl: Hello payload: size %d: %w", h.Size, ErrMalformed)
	case h.RegionSize <= 0:
		return Hello{}, fmt.Errorf("repl: Hello payload: regionSize %d: %w", h.RegionSize, ErrMalformed)
	}
	return h, nil
}
