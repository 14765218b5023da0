package csi

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

func topo(nodes ...string) []*csi.Topology {
	var ts []*csi.Topology
	for _, n := range nodes {
		ts = append(ts, &csi.Topology{Segments: map[string]string{TopologyKey: n}})
	}
	return ts
}

func TestPlace(t *testing.T) {
	const gi = int64(1) << 30
	three := []candidate{{node: "a", free: 10 * gi}, {node: "b", free: 20 * gi}, {node: "c", free: 30 * gi}}
	for _, tc := range []struct {
		name            string
		cands           []candidate
		size            int64
		req             *csi.TopologyRequirement
		primary, backup string
		wantErr         string
	}{
		{name: "most free space", cands: three, size: gi, primary: "c", backup: "b"},
		{name: "preferred node is the primary", cands: three, size: gi, req: &csi.TopologyRequirement{Preferred: topo("a")}, primary: "a", backup: "c"},
		{name: "requisite of two", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("a", "b")}, primary: "b", backup: "a"},
		{name: "requisite of one: backup from anywhere", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("a"), Preferred: topo("a")}, primary: "a", backup: "c"},
		{name: "preferred outside requisite ignored", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("a", "b"), Preferred: topo("c", "a")}, primary: "a", backup: "b"},
		{name: "too small nodes left out", cands: three, size: 15 * gi, primary: "c", backup: "b"},
		{name: "unknown free space last", cands: []candidate{{node: "x", free: -1}, {node: "a", free: gi}, {node: "b", free: 2 * gi}}, size: gi, primary: "b", backup: "a"},
		{name: "unfit nodes left out", cands: []candidate{{node: "a", free: gi, unfit: "cordoned"}, {node: "b", free: gi}, {node: "c", free: gi}}, size: gi, primary: "b", backup: "c"},
		{name: "only one fits", cands: three, size: 25 * gi, wantErr: "only c fits (a: 10Gi free, the volume needs 25Gi; b: 20Gi free, the volume needs 25Gi)"},
		{name: "no agents", cands: nil, size: gi, wantErr: "none fits (no node has a running Tandem agent)"},
		{name: "requisite of two, one fits", cands: []candidate{{node: "a", free: gi}, {node: "b", free: gi, unfit: "Node not Ready"}, {node: "c", free: gi}}, size: gi,
			req: &csi.TopologyRequirement{Requisite: topo("a", "b")}, wantErr: "of the requested topology's nodes (a, b) only a fits (b: Node not Ready)"},
		{name: "requisite names unknown nodes", cands: three, size: gi, req: &csi.TopologyRequirement{Requisite: topo("z")}, wantErr: "none of the requested topology's nodes (z) fits"},
		{name: "requisite with foreign keys allows nothing", cands: three, size: gi,
			req: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{"topology.kubernetes.io/zone": "z1"}}}}, wantErr: "none of the requested topology's nodes () fits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, b, err := place(tc.cands, tc.size, tc.req)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %s/%s, %v; want an error containing %q", p, b, err, tc.wantErr)
				}
				return
			}
			if err != nil || p != tc.primary || b != tc.backup {
				t.Fatalf("got %s/%s, %v; want %s/%s", p, b, err, tc.primary, tc.backup)
			}
		})
	}
}

func TestVolumeSize(t *testing.T) {
	const r = 64 << 10
	for _, tc := range []struct {
		req, lim, want int64
		err            bool
	}{
		{0, 0, DefaultVolumeSize, false},
		{1, 0, r, false},
		{r, 0, r, false},
		{r + 1, 0, 2 * r, false},
		{0, r, r, false},
		{r + 1, 2*r - 1, 0, true},
		{r + 1, 3 * r, 2 * r, false},
		{2 * r, r, 0, true},
		{-1, 0, 0, true},
	} {
		got, err := volumeSize(&csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}, r)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("required %d limit %d: got %d, %v; want %d (error %t)", tc.req, tc.lim, got, err, tc.want, tc.err)
		}
	}
}
