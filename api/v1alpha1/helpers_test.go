package v1alpha1

import (
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"
)

func TestSpecHelpers(t *testing.T) {
	q := func(s string) *resource.Quantity { v := resource.MustParse(s); return &v }
	tests := []struct {
		name       string
		spec       VolumePairSpec
		region     int64
		regions    int64
		merge      bool
		peerOfPrim string
	}{
		{"defaults", VolumePairSpec{Size: *q("1Gi"), Primary: Member{"a"}, Backup: Member{"b"}}, 64 << 10, 16384, true, "b"},
		{"4Ki regions", VolumePairSpec{Size: *q("1Mi"), RegionSize: q("4Ki"), Primary: Member{"a"}, Backup: Member{"b"}}, 4096, 256, true, "b"},
		{"partial last region", VolumePairSpec{Size: *q("100Ki"), RegionSize: q("64Ki"), Primary: Member{"x"}, Backup: Member{"y"}}, 65536, 2, true, "y"},
		{"merge off", VolumePairSpec{Size: *q("1Gi"), Resync: ResyncSpec{MergePrimaryBitmap: ptr.To(false)}, Primary: Member{"a"}, Backup: Member{"b"}}, 65536, 16384, false, "b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.spec.RegionSizeBytes(); got != tt.region {
				t.Errorf("RegionSizeBytes = %d, want %d", got, tt.region)
			}
			if got := tt.spec.Regions(); got != tt.regions {
				t.Errorf("Regions = %d, want %d", got, tt.regions)
			}
			if got := tt.spec.MergesPrimaryBitmap(); got != tt.merge {
				t.Errorf("MergesPrimaryBitmap = %v, want %v", got, tt.merge)
			}
			if got := tt.spec.PeerOf(tt.spec.Primary.Node); got != tt.peerOfPrim {
				t.Errorf("PeerOf(primary) = %q, want %q", got, tt.peerOfPrim)
			}
			if got := tt.spec.PeerOf("stranger"); got != "" {
				t.Errorf("PeerOf(stranger) = %q, want empty", got)
			}
		})
	}
}

func TestMemberStatusLookup(t *testing.T) {
	st := VolumePairStatus{Members: []MemberStatus{{Node: "a", Role: RolePrimary}, {Node: "b", Role: RoleBackup}}}
	if m := st.MemberStatus("b"); m == nil || m.Role != RoleBackup {
		t.Fatalf("MemberStatus(b) = %+v", m)
	}
	st.MemberStatus("a").Connected = true
	if !st.Members[0].Connected {
		t.Fatal("MemberStatus must return a pointer into the slice")
	}
	if st.MemberStatus("c") != nil {
		t.Fatal("MemberStatus(c) must be nil")
	}
}

func TestLeaseNames(t *testing.T) {
	if got := AgentLeaseName("node-a"); got != "tandem-agent-node-a" {
		t.Errorf("AgentLeaseName = %q", got)
	}
	long := AgentLeaseName("a-very-long-node-name-for-testing-that-goes-on-and-on-and-on-x")
	other := AgentLeaseName("a-very-long-node-name-for-testing-that-goes-on-and-on-and-on-y")
	if len(long) > 63 || long == other {
		t.Errorf("long names must be hashed within 63 characters and stay distinct: %q %q", long, other)
	}
}
