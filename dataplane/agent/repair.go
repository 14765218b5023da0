package agent

import (
	"context"
	"fmt"
	"net/http"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// ResyncRequest is the body of POST .../resync: regions the writer must copy
// to its peer again (the repair after `kubectl tandem verify`).
type ResyncRequest struct {
	First uint32 `json:"first"`
	Count uint32 `json:"count"`
}

func (a *Agent) handleResync(w http.ResponseWriter, r *http.Request) {
	v := a.get(r.PathValue("ns") + "/" + r.PathValue("name"))
	if v == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no volume %s/%s on node %s", r.PathValue("ns"), r.PathValue("name"), a.cfg.Node))
		return
	}
	var req ResyncRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if err := v.RequestResync(r.Context(), req.First, req.Count); err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, v.Status())
}

// Resync asks the writer's agent to copy regions to its peer again.
func (c *Client) Resync(ctx context.Context, ns, name string, first, count uint32) (volume.Status, error) {
	var s volume.Status
	return s, c.do(ctx, http.MethodPost, "/v1/volumes/"+ns+"/"+name+"/resync", ResyncRequest{First: first, Count: count}, &s)
}
