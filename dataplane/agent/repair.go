package agent

import (
	"fmt"
	"net/http"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

func (a *Agent) handleResync(w http.ResponseWriter, r *http.Request) {
	v := a.get(r.PathValue("ns") + "/" + r.PathValue("name"))
	if v == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no volume %s/%s on node %s", r.PathValue("ns"), r.PathValue("name"), a.cfg.Node))
		return
	}
	var req agentapi.ResyncRequest
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
