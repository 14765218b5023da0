package envtest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// boundCause is one refusal the API server must give: the field it names
// and the text after the offending value, exactly.
type boundCause struct {
	field, msg string
}

// maxSize is the largest spec.size the data path serves with region size
// rs: v1.MaxRegions regions.
func maxSize(rs int64) int64 { return v1.MaxRegions * rs }

// sizeLimit is the refusal of a spec.size above maxSize(rs); human is
// maxSize(rs)+rs in Ti or Pi.
func sizeLimit(rs int64, human string) boundCause {
	region := fmt.Sprintf("%dKi", rs>>10)
	if rs >= 1<<20 {
		region = fmt.Sprintf("%dMi", rs>>20)
	}
	return boundCause{"spec.size", fmt.Sprintf("spec.size must be at most %d bytes (%s - %s, %d regions of %s): "+
		"the dirty bitmaps number regions with 32 bits; a larger spec.regionSize allows a larger volume",
		maxSize(rs), human, region, v1.MaxRegions, region)}
}

func notMultiple(spelledRegion, spelledSize string) boundCause {
	return boundCause{"spec.size", fmt.Sprintf("spec.size must be a multiple of spec.regionSize (%s): %s is not a whole number of regions", spelledRegion, spelledSize)}
}

const regionRefusal = "spec.regionSize must be a power of two from 4Ki to 64Mi: the granularity of the dirty bitmaps (one bit per region), which the agents accept in that range only"

// TestNumericBounds checks both ends of every numeric field of the
// VolumePair spec against the API server: the largest (or smallest) value
// accepted and the first one refused, with the exact message, which names
// the limit. spec.size's limit is the data path's: at most v1.MaxRegions
// regions of spec.regionSize (dataplane/bitmap numbers regions with 32
// bits; TestGeometryAtRegionLimit in dataplane/volume serves a volume of
// exactly that many). Quantities are sent as written, so every spelling of
// a valid size is accepted: before the fix, 100Ti (and any size the
// quantity parser keeps as a decimal, 1.5Ti, 100000Gi, 1Pi) was refused as
// "not a positive whole number of bytes" and "not a multiple of
// spec.regionSize", while 99Ti with 4Ki regions, too many for the bitmaps,
// was accepted.
func TestNumericBounds(t *testing.T) {
	const (
		ki = int64(1) << 10
		mi = int64(1) << 20
	)
	long := func(n int) string { return strings.Repeat("a", n) }
	nodes := func(n int) []any {
		var out []any
		for i := range n {
			out = append(out, fmt.Sprintf("node-%d", i))
		}
		return out
	}
	backups := func(n int) []any {
		var out []any
		for i := range n {
			out = append(out, map[string]any{"node": fmt.Sprintf("extra-%d", i)})
		}
		return out
	}
	tests := []struct {
		name string
		set  map[string]any // dotted path under spec -> value, as a manifest writes it
		want []boundCause   // nil: accepted
	}{
		// spec.size, with the default 64Ki regions.
		{name: "size one region, the smallest", set: map[string]any{"size": "64Ki"}},
		{name: "size 0", set: map[string]any{"size": int64(0)}, want: []boundCause{{"spec.size", "spec.size must be greater than 0"}}},
		{name: "size negative", set: map[string]any{"size": "-64Ki"}, want: []boundCause{{"spec.size", "spec.size must be greater than 0"}}},
		{name: "size one byte short of a region", set: map[string]any{"size": int64(64*ki - 1)}, want: []boundCause{notMultiple("64Ki", "65535")}},
		{name: "size a fraction of a byte", set: map[string]any{"size": "1.5"}, want: []boundCause{notMultiple("64Ki", "1.5")}},
		{name: "size 1Gi in 64Ki regions", set: map[string]any{"size": "1Gi", "regionSize": "64Ki"}},
		{name: "size 100Ti (issue 19)", set: map[string]any{"size": "100Ti"}},
		{name: "size 1.5Ti", set: map[string]any{"size": "1.5Ti"}},
		{name: "size 100000Gi", set: map[string]any{"size": "100000Gi"}},
		{name: "size 255Ti", set: map[string]any{"size": "255Ti"}},
		{name: "size the most regions of 64Ki", set: map[string]any{"size": maxSize(64 * ki)}},
		{name: "size one byte over the most regions of 64Ki", set: map[string]any{"size": maxSize(64*ki) + 1}, want: []boundCause{sizeLimit(64*ki, "256Ti")}},
		{name: "size 256Ti, one region too many", set: map[string]any{"size": "256Ti"}, want: []boundCause{sizeLimit(64*ki, "256Ti")}},
		{name: "size 900Ti (issue 19)", set: map[string]any{"size": "900Ti"}, want: []boundCause{sizeLimit(64*ki, "256Ti")}},
		{name: "size 1e30", set: map[string]any{"size": "1e30"}, want: []boundCause{sizeLimit(64*ki, "256Ti")}},
		{name: "size 8Ei", set: map[string]any{"size": "8Ei"}, want: []boundCause{sizeLimit(64*ki, "256Ti")}},
		// spec.size with the smallest and the largest region size.
		{name: "size the most regions of 4Ki", set: map[string]any{"size": maxSize(4 * ki), "regionSize": "4Ki"}},
		{name: "size 1T in 4Ki regions", set: map[string]any{"size": "1T", "regionSize": "4Ki"}},
		{name: "size 16Ti in 4Ki regions", set: map[string]any{"size": "16Ti", "regionSize": "4Ki"}, want: []boundCause{sizeLimit(4*ki, "16Ti")}},
		{name: "size 99Ti in 4Ki regions", set: map[string]any{"size": "99Ti", "regionSize": "4Ki"}, want: []boundCause{sizeLimit(4*ki, "16Ti")}},
		{name: "size 100Ti in 4Ki regions", set: map[string]any{"size": "100Ti", "regionSize": "4Ki"}, want: []boundCause{sizeLimit(4*ki, "16Ti")}},
		{name: "size in 4Ki regions spelled in bytes", set: map[string]any{"size": maxSize(4*ki) + 4*ki, "regionSize": "4096"}, want: []boundCause{sizeLimit(4*ki, "16Ti")}},
		{name: "size 1Pi in 64Mi regions", set: map[string]any{"size": "1Pi", "regionSize": "64Mi"}},
		{name: "size the most regions of 64Mi", set: map[string]any{"size": maxSize(64 * mi), "regionSize": "64Mi"}},
		{name: "size a byte short of the most regions of 64Mi", set: map[string]any{"size": maxSize(64*mi) - 1, "regionSize": "64Mi"}, want: []boundCause{notMultiple("64Mi", "288230376084602879")}},
		{name: "size 2^55 and a byte in 64Mi regions, beyond a double's precision", set: map[string]any{"size": int64(1)<<55 + 1, "regionSize": "64Mi"}, want: []boundCause{notMultiple("64Mi", "36028797018963969")}},
		{name: "size 2^55 and a region in 64Mi regions", set: map[string]any{"size": int64(1)<<55 + 64*mi, "regionSize": "64Mi"}},
		{name: "size not a multiple, regionSize spelled in bytes", set: map[string]any{"size": int64(4097), "regionSize": int64(4096)}, want: []boundCause{notMultiple("4Ki", "4097")}},
		{name: "size -1e30", set: map[string]any{"size": "-1e30"}, want: []boundCause{{"spec.size", "spec.size must be greater than 0"}}},
		{name: "size 256Pi in 64Mi regions", set: map[string]any{"size": "256Pi", "regionSize": "64Mi"}, want: []boundCause{sizeLimit(64*mi, "256Pi")}},
		{name: "size 1Pi in 256Ki regions", set: map[string]any{"size": "1Pi", "regionSize": "256Ki"}, want: []boundCause{sizeLimit(256*ki, "1Pi")}},

		// spec.regionSize: a power of two from 4Ki to 64Mi.
		{name: "regionSize 4Ki, the smallest", set: map[string]any{"size": "4Ki", "regionSize": "4Ki"}},
		{name: "regionSize 4095", set: map[string]any{"size": "64Ki", "regionSize": int64(4095)}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 2Ki", set: map[string]any{"size": "64Ki", "regionSize": "2Ki"}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 64Mi, the largest", set: map[string]any{"size": "64Mi", "regionSize": "64Mi"}},
		{name: "regionSize 64Mi and a byte", set: map[string]any{"size": "128Mi", "regionSize": int64(64*mi + 1)}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 128Mi", set: map[string]any{"size": "128Mi", "regionSize": "128Mi"}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 12Ki, not a power of two", set: map[string]any{"size": "1200Ki", "regionSize": "12Ki"}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 0.0625Mi, 64Ki spelled as a fraction", set: map[string]any{"size": "1Gi", "regionSize": "0.0625Mi"}},
		{name: "regionSize 1e30", set: map[string]any{"size": "1Gi", "regionSize": "1e30"}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize -1e30", set: map[string]any{"size": "1Gi", "regionSize": "-1e30"}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 64Ki and a fraction", set: map[string]any{"size": "1Gi", "regionSize": "65536.5"}, want: []boundCause{{"spec.regionSize", regionRefusal}}},
		{name: "regionSize 0.5Mi, a power of two spelled as a fraction", set: map[string]any{"size": "1Gi", "regionSize": "0.5Mi"}},

		// spec.failover.
		{name: "probePeriodSeconds 1", set: map[string]any{"failover.probePeriodSeconds": int64(1)}},
		{name: "probePeriodSeconds 0", set: map[string]any{"failover.probePeriodSeconds": int64(0)},
			want: []boundCause{{"spec.failover.probePeriodSeconds", "spec.failover.probePeriodSeconds in body should be greater than or equal to 1"}}},
		{name: "probePeriodSeconds 60", set: map[string]any{"failover.probePeriodSeconds": int64(60), "failover.leaseDurationSeconds": int64(61)}},
		{name: "probePeriodSeconds 61", set: map[string]any{"failover.probePeriodSeconds": int64(61), "failover.leaseDurationSeconds": int64(300)},
			want: []boundCause{{"spec.failover.probePeriodSeconds", "spec.failover.probePeriodSeconds in body should be less than or equal to 60"}}},
		{name: "failureThreshold 1", set: map[string]any{"failover.failureThreshold": int64(1)}},
		{name: "failureThreshold 0", set: map[string]any{"failover.failureThreshold": int64(0)},
			want: []boundCause{{"spec.failover.failureThreshold", "spec.failover.failureThreshold in body should be greater than or equal to 1"}}},
		{name: "failureThreshold 30", set: map[string]any{"failover.failureThreshold": int64(30)}},
		{name: "failureThreshold 31", set: map[string]any{"failover.failureThreshold": int64(31)},
			want: []boundCause{{"spec.failover.failureThreshold", "spec.failover.failureThreshold in body should be less than or equal to 30"}}},
		{name: "leaseDurationSeconds 2", set: map[string]any{"failover.leaseDurationSeconds": int64(2), "failover.probePeriodSeconds": int64(1)}},
		{name: "leaseDurationSeconds 1", set: map[string]any{"failover.leaseDurationSeconds": int64(1), "failover.probePeriodSeconds": int64(1)},
			want: []boundCause{
				{"spec.failover.leaseDurationSeconds", "spec.failover.leaseDurationSeconds in body should be greater than or equal to 2"},
				{"spec.failover", "spec.failover.leaseDurationSeconds must be greater than spec.failover.probePeriodSeconds"},
			}},
		{name: "leaseDurationSeconds 300", set: map[string]any{"failover.leaseDurationSeconds": int64(300)}},
		{name: "leaseDurationSeconds 301", set: map[string]any{"failover.leaseDurationSeconds": int64(301)},
			want: []boundCause{{"spec.failover.leaseDurationSeconds", "spec.failover.leaseDurationSeconds in body should be less than or equal to 300"}}},
		{name: "leaseDurationSeconds one more than probePeriodSeconds", set: map[string]any{"failover.leaseDurationSeconds": int64(11), "failover.probePeriodSeconds": int64(10)}},
		{name: "leaseDurationSeconds equal to probePeriodSeconds", set: map[string]any{"failover.leaseDurationSeconds": int64(10), "failover.probePeriodSeconds": int64(10)},
			want: []boundCause{{"spec.failover", "spec.failover.leaseDurationSeconds must be greater than spec.failover.probePeriodSeconds"}}},

		// spec.resync.maxBytesPerSecond: 0 (unlimited) up to any int64.
		{name: "maxBytesPerSecond 0", set: map[string]any{"resync.maxBytesPerSecond": int64(0)}},
		{name: "maxBytesPerSecond -1", set: map[string]any{"resync.maxBytesPerSecond": int64(-1)},
			want: []boundCause{{"spec.resync.maxBytesPerSecond", "spec.resync.maxBytesPerSecond in body should be greater than or equal to 0"}}},
		{name: "maxBytesPerSecond the largest", set: map[string]any{"resync.maxBytesPerSecond": int64(math.MaxInt64)}},

		// Counts and lengths.
		{name: "additionalBackups 2", set: map[string]any{"additionalBackups": backups(2)}},
		{name: "additionalBackups 3", set: map[string]any{"additionalBackups": backups(3)},
			want: []boundCause{{"spec.additionalBackups", "must have at most 2 items"}}},
		{name: "clients.nodes 4", set: map[string]any{"clients.nodes": nodes(4)}},
		{name: "clients.nodes 5", set: map[string]any{"clients.nodes": nodes(5)},
			want: []boundCause{{"spec.clients.nodes", "must have at most 4 items"}}},
		{name: "clients.nodes 0", set: map[string]any{"clients.nodes": []any{}}},
		{name: "primary.node 253 characters", set: map[string]any{"primary.node": long(253)}},
		{name: "primary.node 254 characters", set: map[string]any{"primary.node": long(254)},
			want: []boundCause{{"spec.primary.node", "may not be more than 253 bytes"}}},
		{name: "clients.nodes item 253 characters", set: map[string]any{"clients.nodes": []any{long(253)}}},
		{name: "clients.nodes item 254 characters", set: map[string]any{"clients.nodes": []any{long(254)}},
			want: []boundCause{{"spec.clients.nodes[0]", "may not be more than 253 bytes"}}},
	}
	ctx := context.Background()
	ns := newNamespace(t)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := map[string]any{"size": "1Gi", "mode": "Async", "primary": map[string]any{"node": "node-a"}, "backup": map[string]any{"node": "node-b"}}
			for path, v := range tt.set {
				setPath(spec, strings.Split(path, "."), v)
			}
			vp := &unstructured.Unstructured{Object: map[string]any{
				"apiVersion": v1.GroupVersion.String(), "kind": "VolumePair",
				"metadata": map[string]any{"name": fmt.Sprintf("bound-%d", i), "namespace": ns},
				"spec":     spec,
			}}
			err := k8s.Create(ctx, vp)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("refused; want accepted: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted; want refused with %+v", tt.want)
			}
			var st apierrors.APIStatus
			if !errors.As(err, &st) || !apierrors.IsInvalid(err) || st.Status().Details == nil {
				t.Fatalf("error is not an Invalid status with details: %v", err)
			}
			var causes []metav1.StatusCause
			for _, c := range st.Status().Details.Causes {
				// A list or string over its bound skips the CEL rules; the
				// API server says so in a cause of its own.
				if strings.Contains(c.Message, "some validation rules were not checked because the object was invalid") {
					continue
				}
				causes = append(causes, c)
			}
			var got []string
			for _, c := range causes {
				got = append(got, fmt.Sprintf("%s: %s", c.Field, c.Message))
			}
			if len(causes) != len(tt.want) {
				t.Fatalf("refused with %d causes, want %d:\n  %s\nwant:\n  %+v", len(causes), len(tt.want), strings.Join(got, "\n  "), tt.want)
			}
			for _, w := range tt.want {
				found := false
				for _, c := range causes {
					if c.Field == w.field && strings.HasSuffix(c.Message, ": "+w.msg) {
						found = true
					}
				}
				if !found {
					t.Errorf("no cause on %s ending in %q; got:\n  %s", w.field, w.msg, strings.Join(got, "\n  "))
				}
			}
		})
	}
}

// setPath sets m[path[0]]...[path[n-1]] = v, creating maps on the way.
func setPath(m map[string]any, path []string, v any) {
	for _, p := range path[:len(path)-1] {
		next, ok := m[p].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[p] = next
		}
		m = next
	}
	m[path[len(path)-1]] = v
}
