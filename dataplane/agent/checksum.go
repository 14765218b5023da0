package agent

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"syscall"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// handleChecksums serves GET /v1/volumes/{ns}/{name}/checksums?first=F&count=N.
// first defaults to 0 and count to as many regions as one call allows
// (agentapi.MaxChecksumRegions), cut at the end of the volume.
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
	def := uint32(min(uint64(agentapi.MaxChecksumRegions), regions-min(regions, uint64(first))))
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
	out := agentapi.Checksums{RegionSize: rs, First: first, Algorithm: agentapi.ChecksumAlgorithm, Sums: make([]string, len(sums))}
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
