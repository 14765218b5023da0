package agent

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"syscall"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// ChecksumAlgorithm names the hash in Checksums.Algorithm.
const ChecksumAlgorithm = "sha256"

// Checksums is the answer of GET .../checksums: one hex digest per region,
// for regions First, First+1, ... of the local replica.
type Checksums struct {
	RegionSize int64    `json:"regionSize"`
	First      uint32   `json:"first"`
	Algorithm  string   `json:"algorithm"`
	Sums       []string `json:"sums"`
}

// handleChecksums serves GET /v1/volumes/{ns}/{name}/checksums?first=F&count=N.
// first defaults to 0 and count to as many regions as one call allows
// (volume.MaxChecksumRegions), cut at the end of the volume.
func (a *Agent) handleChecksums(w http.ResponseWriter, r *http.Request) {
	v := a.get(r.PathValue("ns") + "/" + r.PathValue("name"))
	if v == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no volume %s/%s on node %s", r.PathValue("ns"), r.PathValue("name"), a.cfg.Node))
		return
	}
	q := r.URL.Query()
	first, err := queryUint32(q, "first", 0)
	if err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	rs := v.Status().RegionSize
	regions := uint64(v.Size() / rs)
	def := uint32(min(uint64(volume.MaxChecksumRegions), regions-min(regions, uint64(first))))
	count, err := queryUint32(q, "count", def)
	if err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	sums, err := v.RegionChecksums(r.Context(), first, count)
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, syscall.EINVAL) {
			code = http.StatusBadRequest
		}
		writeErr(w, code, err)
		return
	}
	out := Checksums{RegionSize: rs, First: first, Algorithm: ChecksumAlgorithm, Sums: make([]string, len(sums))}
	for i := range sums {
		out.Sums[i] = hex.EncodeToString(sums[i][:])
	}
	writeJSON(w, http.StatusOK, out)
}

func queryUint32(q url.Values, key string, def uint32) (uint32, error) {
	s := q.Get(key)
	if s == "" {
		return def, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("query parameter %s=%q: want a region number from 0 to %d", key, s, uint32(1<<32-1))
	}
	return uint32(n), nil
}

// Checksums returns the SHA-256 of count regions of a volume's local replica,
// starting at region first (count ≤ volume.MaxChecksumRegions).
func (c *Client) Checksums(ctx context.Context, ns, name string, first, count uint32) (Checksums, error) {
	var s Checksums
	path := fmt.Sprintf("/v1/volumes/%s/%s/checksums?first=%d&count=%d", ns, name, first, count)
	if err := c.do(ctx, http.MethodGet, path, nil, &s); err != nil {
		return s, err
	}
	if s.Algorithm != "" && s.Algorithm != ChecksumAlgorithm {
		return s, fmt.Errorf("checksums of %s/%s: agent uses %q, want %q", ns, name, s.Algorithm, ChecksumAlgorithm)
	}
	if len(s.Sums) != int(count) || s.First != first {
		return s, fmt.Errorf("checksums of %s/%s: asked for regions [%d, +%d), got [%d, +%d)", ns, name, first, count, s.First, len(s.Sums))
	}
	return s, nil
}
