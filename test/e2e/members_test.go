//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Story 17: a member's node is replaced without deleting the pair (a node
// retired for good). The backup node-b is replaced by node-c in the spec:
// node-c receives a full copy while the writer keeps serving, the pair is
// in sync on node-a and node-c, both replicas are byte-identical, every
// acknowledged write reads back, and node-b's replica is deleted once
// redundancy is back.
func TestStory17ReplaceMember(t *testing.T) {
	s := newStory(t, "swap-disk")
	const size = 64 << 20
	s.apply(s.pairManifest("Sync", "node-a", "node-b", "64Mi", ""))
	vp := s.wait(60*time.Second, "PAIR", inSync("node-a"))
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x51 0 8M", "write -P 0x52 40M 2M")
	s.wait(30*time.Second, "in sync", inSync("node-a"))
	oldDir := filepath.Dir(s.replicaPath("node-b"))
	if _, err := os.Stat(oldDir); err != nil {
		t.Fatalf("node-b's replica: %v", err)
	}
	before := s.agentStatus("node-a").Copy.CopiedBytesTotal

	mustKubectl(t, "patch", "vp", s.name, "-n", s.ns, "--type=merge", "-p", `{"spec":{"backup":{"node":"node-c"}}}`)
	replacedAt := time.Now()
	// Writes go on during the copy.
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x53 20M 1M")
	vp = s.wait(120*time.Second, "in sync with node-c", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus("node-c")
		return inSync("node-a")(vp) && ms != nil && ms.DataState == v1.DataUpToDate && ms.LastSeen != nil && ms.LastSeen.After(replacedAt)
	})
	copied := s.agentStatus("node-a").Copy.CopiedBytesTotal - before
	t.Logf("STORY 17 node-b replaced by node-c: full copy %d bytes of %d in %.1fs", copied, size, time.Since(replacedAt).Seconds())
	if copied < size {
		t.Fatalf("the copy to node-c was %d bytes, not the whole volume (%d)", copied, size)
	}
	s.identical("node-a", "node-c")
	mustQemuIO(t, vp.Status.Endpoint, "read -P 0x51 0 8M", "read -P 0x53 20M 1M", "read -P 0x52 40M 2M")
	s.wait(60*time.Second, "node-b's replica deleted", func(vp *v1.VolumePair) bool {
		_, err := os.Stat(oldDir)
		return len(vp.Status.RemovedMembers) == 0 && os.IsNotExist(err) && vp.Status.MemberStatus("node-b") == nil
	})
	ev := mustKubectl(t, "get", "events", "-n", s.ns)
	for _, want := range []string{"MemberReplaced", "MemberRemoved"} {
		if !strings.Contains(ev, want) {
			t.Errorf("no %s event:\n%s", want, ev)
		}
	}
	// kubectl shows the new member.
	out := mustKubectl(t, "get", "vp", s.name, "-n", s.ns, "-o", "jsonpath={.spec.backup.node} {.status.members[*].node}")
	if fmt.Sprint(strings.Fields(out)) != "[node-c node-a node-c]" && fmt.Sprint(strings.Fields(out)) != "[node-c node-c node-a]" {
		t.Fatalf("spec.backup and status.members: %q", out)
	}
}

// Story 18: three copies. A Sync pair node-a → node-b with an Async third
// member on node-c. node-c's agent stops and node-a writes on; then
// node-a's node is lost: node-b, the Sync backup that holds every
// acknowledged write, takes over; node-c comes back and gets from node-b
// only what it missed (a diff, far smaller than the volume), and so does
// node-a when its node returns. All three replicas end byte-identical and
// every acknowledged write reads back. Then node-c is removed from the
// pair (its replica deleted once the others are in sync) and added again:
// a new member, so a full copy, then three in sync.
func TestStory18ThreeMembers(t *testing.T) {
	s := newStory(t, "three")
	const size = 256 << 20
	s.apply(s.pairManifest("Sync", "node-a", "node-b", "256Mi", "  additionalBackups:\n  - {node: node-c, mode: Async}\n"))
	all := func(active, n string) func(*v1.VolumePair) bool {
		return func(vp *v1.VolumePair) bool { return inSync(active)(vp) && vp.Status.MembersInSync == n }
	}
	vp := s.wait(90*time.Second, "three members in sync", all("node-a", "3/3"))
	if ms := vp.Status.MemberStatus("node-c"); ms == nil || ms.Mode != v1.ModeAsync || ms.Role != v1.RoleBackup {
		t.Fatalf("node-c's status: %+v", ms)
	}
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x61 0 8M")
	s.wait(60*time.Second, "in sync after the first writes", all("node-a", "3/3"))

	// node-c's agent stops; node-a writes on (node-b, Sync, holds it all).
	s.lc("kill-agent", "node-c")
	s.wait(60*time.Second, "node-c away", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == "node-a" && vp.Status.MembersInSync == "2/3"
	})
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x62 100M 2M")

	// node-a is lost: node-b takes over.
	s.lc("kill-node", "node-a")
	lostAt := time.Now()
	took := s.writeUntilAccepted(lostAt, 60*time.Second, "write -P 0x63 200M 1M")
	vp = s.get()
	if vp.Status.ActivePrimary != "node-b" {
		t.Fatalf("the writer after node-a's loss is %q, want the Sync backup node-b", vp.Status.ActivePrimary)
	}
	t.Logf("STORY 18 node-a lost → first write accepted on node-b in %.2fs", took.Seconds())

	// node-c returns: a diff from node-b.
	before := s.agentStatus("node-b").Copy.CopiedBytesTotal
	s.lc("start-agent", "node-c")
	s.wait(120*time.Second, "node-c in sync with node-b", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus("node-c")
		return vp.Status.ActivePrimary == "node-b" && vp.Status.MembersInSync == "2/3" && ms != nil && ms.DataState == v1.DataUpToDate && ms.Connected
	})
	toC := s.agentStatus("node-b").Copy.CopiedBytesTotal - before
	t.Logf("STORY 18 node-c resynced from node-b: %d bytes of a %d-byte volume (3 MiB written while it was away)", toC, size)
	if toC <= 0 || toC >= size/8 {
		t.Fatalf("node-b copied %d bytes to node-c; want a diff, not the volume", toC)
	}

	// node-a returns: a diff too; the failback policy is Manual, node-b stays.
	before = s.agentStatus("node-b").Copy.CopiedBytesTotal
	s.lc("restore-node", "node-a")
	vp = s.wait(180*time.Second, "three members in sync under node-b", all("node-b", "3/3"))
	toA := s.agentStatus("node-b").Copy.CopiedBytesTotal - before
	t.Logf("STORY 18 node-a resynced from node-b: %d bytes", toA)
	if toA >= size/8 {
		t.Fatalf("node-b copied %d bytes to node-a; want a diff, not the volume", toA)
	}
	s.identical("node-b", "node-c")
	s.identical("node-b", "node-a")
	mustQemuIO(t, vp.Status.Endpoint, "read -P 0x61 0 8M", "read -P 0x62 100M 2M", "read -P 0x63 200M 1M")

	// node-c leaves the pair, then joins again: a full copy.
	cDir := filepath.Dir(s.replicaPath("node-c"))
	mustKubectl(t, "patch", "vp", s.name, "-n", s.ns, "--type=merge", "-p", `{"spec":{"additionalBackups":null}}`)
	s.wait(60*time.Second, "node-c's replica deleted", func(vp *v1.VolumePair) bool {
		_, err := os.Stat(cDir)
		return len(vp.Status.RemovedMembers) == 0 && os.IsNotExist(err) && vp.Status.MemberStatus("node-c") == nil && vp.Status.MembersInSync == "2/2"
	})
	before = s.agentStatus("node-b").Copy.CopiedBytesTotal
	mustKubectl(t, "patch", "vp", s.name, "-n", s.ns, "--type=merge", "-p", `{"spec":{"additionalBackups":[{"node":"node-c","mode":"Async"}]}}`)
	s.wait(180*time.Second, "node-c back, three in sync", all("node-b", "3/3"))
	full := s.agentStatus("node-b").Copy.CopiedBytesTotal - before
	t.Logf("STORY 18 node-c added again: full copy of %d bytes", full)
	if full < size {
		t.Fatalf("the copy to the re-added node-c was %d bytes, not the whole volume (%d)", full, size)
	}
	s.identical("node-b", "node-c")
	mustQemuIO(t, s.get().Status.Endpoint, "read -P 0x61 0 8M", "read -P 0x62 100M 2M", "read -P 0x63 200M 1M")
}
