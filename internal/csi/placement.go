package csi

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/apimachinery/pkg/api/resource"
)

// candidate is a node the controller could put a member on.
type candidate struct {
	node string
	free int64 // bytes free for replicas; -1 when the agent did not say
	// unfit says why the node cannot hold a member ("" when it can).
	unfit string
}

// topologyNodes returns the node names a list of topology segments allows,
// and whether it constrains at all (an empty list does not). Segments that
// do not name a node under TopologyKey allow nothing.
func topologyNodes(ts []*csi.Topology) (map[string]bool, bool) {
	if len(ts) == 0 {
		return nil, false
	}
	m := map[string]bool{}
	for _, t := range ts {
		if n, ok := t.GetSegments()[TopologyKey]; ok && len(t.GetSegments()) == 1 {
			m[n] = true
		}
	}
	return m, true
}

// place chooses the primary and the backup for a volume of size bytes:
// two distinct eligible nodes, the first eligible preferred node as the
// primary, then the most free space. With a requisite topology the rule is
// the CSI spec's for a volume accessible from two topologies: both members
// from the requisite list when it names two or more nodes; when it names one,
// that node is the primary and the backup may be any other. The error says
// why each node was left out.
func place(cands []candidate, size int64, req *csi.TopologyRequirement) (primary, backup string, err error) {
	allowed, constrained := topologyNodes(req.GetRequisite())
	var eligible []candidate
	var left []string
	for _, c := range cands {
		switch {
		case c.unfit != "":
			left = append(left, fmt.Sprintf("%s: %s", c.node, c.unfit))
		case c.free >= 0 && c.free < size:
			left = append(left, fmt.Sprintf("%s: %s free, the volume needs %s", c.node, qty(c.free), qty(size)))
		default:
			eligible = append(eligible, c)
		}
	}
	// Most free space first; unknown free space last; then by name, so that
	// the choice is stable.
	slices.SortStableFunc(eligible, func(a, b candidate) int {
		if c := cmp.Compare(b.free, a.free); c != 0 {
			return c
		}
		return cmp.Compare(a.node, b.node)
	})
	inTopology := eligible
	if constrained {
		inTopology = nil
		for _, c := range eligible {
			if allowed[c.node] {
				inTopology = append(inTopology, c)
			}
		}
	}
	fail := func(what string) (string, string, error) {
		why := "no node has a running Tandem agent"
		if len(left) > 0 {
			why = strings.Join(left, "; ")
		}
		return "", "", fmt.Errorf("a VolumePair needs two nodes with a running Tandem agent and room for %s; %s (%s)", qty(size), what, why)
	}
	if len(inTopology) == 0 {
		if constrained {
			return fail(fmt.Sprintf("none of the requested topology's nodes (%s) fits", strings.Join(sortedKeys(allowed), ", ")))
		}
		return fail("none fits")
	}
	pick := 0
	for _, t := range req.GetPreferred() {
		n, ok := t.GetSegments()[TopologyKey]
		if !ok {
			continue
		}
		if i := slices.IndexFunc(inTopology, func(c candidate) bool { return c.node == n }); i >= 0 {
			pick = i
			break
		}
	}
	primary = inTopology[pick].node
	pool := inTopology
	if constrained && len(allowed) == 1 {
		pool = eligible
	}
	for _, c := range pool {
		if c.node != primary {
			return primary, c.node, nil
		}
	}
	if constrained && len(allowed) > 1 {
		return fail(fmt.Sprintf("of the requested topology's nodes (%s) only %s fits", strings.Join(sortedKeys(allowed), ", "), primary))
	}
	return fail("only " + primary + " fits")
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func qty(n int64) string { return resource.NewQuantity(n, resource.BinarySI).String() }
