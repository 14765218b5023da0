//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Story 11: a member whose data directory is wiped (a replaced disk) comes
// back as a new replica: it is copied in full before the pair reports in
// sync, and both replicas end byte-identical. First the backup's, then the
// writer's directory: the backup takes over rather than the wiped writer
// serving an empty volume, and the wiped member is never made the writer
// before its copy completes.
func TestStory11WipedMember(t *testing.T) {
	s := newStory(t, "disk")
	const size = 128 << 20
	s.apply(s.pairManifest("Sync", "node-a", "node-b", "128Mi", "  failback: {policy: Automatic}\n"))
	vp := s.wait(60*time.Second, "PAIR", inSync("node-a"))
	if !vp.Status.DataInitialized {
		t.Fatalf("status.dataInitialized not set: %+v", vp.Status)
	}
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x31 0 24M", "write -P 0x32 100M 4M")
	s.wait(30*time.Second, "in sync", inSync("node-a"))

	for _, c := range []struct{ wiped, other string }{{"node-b", "node-a"}, {"node-a", "node-b"}} {
		before := s.agentStatus(c.other).Copy.CopiedBytesTotal
		dir := filepath.Dir(s.replicaPath(c.wiped))
		s.lc("kill-agent", c.wiped)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		wipedAt := time.Now()
		s.lc("start-agent", c.wiped)
		if c.wiped == "node-a" {
			// The writer lost its data: the backup is promoted once the
			// old writer's authority has expired, and serves the data.
			// The automatic failback may bring the writer role home
			// within a second of that (the full copy of a volume that is
			// mostly zeros is quick), so the failover is awaited as an
			// epoch, and the Failover event says who was promoted.
			vp = s.wait(60*time.Second, "failover away from the wiped writer", func(vp *v1.VolumePair) bool {
				return vp.Status.Epoch >= 2 && vp.Status.Endpoint != ""
			})
			s.wantEvent("Failover", "Writer node-a lost; promoted node-b at epoch 2")
			// A read of other data than was written fails the story at
			// once. A refused I/O is tried again on the endpoint the
			// status names then: a connection opened on a member that
			// has just handed the writer role back is refused (new
			// connections go to the writer; open ones are forwarded).
			cmds := []string{"read -P 0x31 0 24M", "write -P 0x33 64M 1M"}
			for deadline := time.Now().Add(15 * time.Second); ; {
				out, err := qemuIO(vp.Status.Endpoint, cmds...)
				if err == nil {
					break
				}
				if strings.Contains(out, "Pattern verification failed") || time.Now().After(deadline) {
					s.logMembers(c.other, c.wiped)
					t.Fatalf("the I/O after the failover failed: qemu-io %v on %s: %v\n%s", cmds, vp.Status.Endpoint, err, out)
				}
				t.Logf("STORY 11 I/O refused by %s (writer %s at epoch %d): qemu-io %v: %v\n%s", vp.Status.Endpoint, vp.Status.ActivePrimary, vp.Status.Epoch, cmds, err, out)
				time.Sleep(500 * time.Millisecond)
				vp = s.get()
			}
		}
		// Until the wiped member holds the data, it is not UpToDate and
		// the pair is not Synchronized; watch every status until then.
		var sawCopy bool
		deadline := time.Now().Add(120 * time.Second)
		for {
			// The status first, the agent after (see the envtest
			// story): an agent that does not answer tells nothing.
			vp = s.get()
			ms := vp.Status.MemberStatus(c.wiped)
			st := s.agentStatusOK(c.wiped)
			holds := st != nil && st.Joined && st.DataState == agentapi.UpToDate
			if vp.Status.Copy != nil && vp.Status.Copy.FullCopy {
				sawCopy = true
			}
			if st != nil && !holds && condTrue(vp, v1.ConditionSynchronized) && ms != nil && ms.LastSeen != nil && ms.LastSeen.After(wipedAt) {
				t.Fatalf("the pair reports Synchronized while %s holds none of its data: %+v", c.wiped, vp.Status)
			}
			if st != nil && !st.Joined && st.Writable {
				t.Fatalf("the wiped member %s serves writes: %+v", c.wiped, st)
			}
			if holds {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never got the data back: %+v", c.wiped, vp.Status)
			}
			time.Sleep(100 * time.Millisecond)
		}
		final := "node-a" // the automatic failback brings the writer role home
		vp = s.wait(120*time.Second, "in sync with the wiped member", func(vp *v1.VolumePair) bool {
			ms := vp.Status.MemberStatus(c.wiped)
			return inSync(final)(vp) && ms != nil && ms.LastSeen != nil && ms.LastSeen.After(wipedAt) && ms.DataState == v1.DataUpToDate
		})
		copied := s.agentStatus(c.other).Copy.CopiedBytesTotal - before
		t.Logf("STORY 11 %s wiped: full copy %d bytes of %d (copy seen in status: %v)", c.wiped, copied, size, sawCopy)
		if copied < size {
			t.Fatalf("the copy to the wiped member %s was %d bytes, not the whole volume (%d)", c.wiped, copied, size)
		}
		s.identical("node-a", "node-b")
		mustQemuIO(t, vp.Status.Endpoint, "read -P 0x31 0 24M", "read -P 0x32 100M 4M")
	}
	mustQemuIO(t, vp.Status.Endpoint, "read -P 0x33 64M 1M")
}

// logMembers logs the VolumePair's status and each node's agent report.
func (s *story) logMembers(nodes ...string) {
	s.t.Helper()
	if out, err := kubectl(s.t, "get", "vp", s.name, "-n", s.ns, "-o", "jsonpath={.status}"); err == nil {
		s.t.Logf("VolumePair status: %s", out)
	}
	for _, n := range nodes {
		b, _ := json.Marshal(s.agentStatusOK(n))
		s.t.Logf("agent %s: %s", n, b)
	}
}

// agentStatusOK is agentStatus that returns nil when the agent does not
// answer or has no replica (yet).
func (s *story) agentStatusOK(node string) *agentapi.Status {
	out, err := kubectl(s.t, "-n", "tandem-system", "get", "lease", v1.AgentLeaseName(node), "-o", "jsonpath={.metadata.annotations.storage\\.tandem\\.dev/control-endpoint}")
	if err != nil {
		return nil
	}
	c := agentapi.NewClient(strings.TrimSpace(out), agentToken)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := c.Get(ctx, s.ns, s.name)
	if err != nil {
		return nil
	}
	return &st
}

// Story 12: two pairs whose names used to share one authority Lease
// (team-a/db and team/a-db) on the same two nodes stay independent: a
// requested failover of one moves only its own writer, and deleting one
// leaves the other serving.
func TestStory12CollidingNames(t *testing.T) {
	for _, ns := range []string{"team-a", "team"} {
		_, _ = kubectl(t, "create", "namespace", ns)
		t.Cleanup(func() { _, _ = kubectl(t, "delete", "vp", "--all", "-n", ns, "--wait=true", "--timeout=60s") })
	}
	x := &story{t: t, ns: "team-a", name: "db", touched: map[string]bool{}}
	y := &story{t: t, ns: "team", name: "a-db", touched: map[string]bool{}}
	t.Cleanup(func() {
		if t.Failed() {
			x.dumpLogs()
			y.dumpLogs()
		}
		_, _ = lcRun("start-agent", "node-a")
	})
	// x: writer node-a, Manual failover. y: writer node-b, backup node-a.
	x.apply(x.pairManifest("Async", "node-a", "node-b", "64Mi", "  failover: {policy: Manual}\n"))
	y.apply(y.pairManifest("Async", "node-b", "node-a", "64Mi", ""))
	vx := x.wait(60*time.Second, "team-a/db PAIR", inSync("node-a"))
	vy := y.wait(60*time.Second, "team/a-db PAIR", inSync("node-b"))
	leases := mustKubectl(t, "-n", "tandem-system", "get", "lease", "-l", "storage.tandem.dev/component=authority",
		"-o", "jsonpath={range .items[*]}{.metadata.name} {.metadata.annotations.storage\\.tandem\\.dev/volumepair} {.spec.holderIdentity}{\"\\n\"}{end}")
	var ownX, ownY int
	for _, l := range strings.Split(strings.TrimSpace(leases), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 3 && f[1] == "team-a/db" && f[2] == "node-a":
			ownX++
		case len(f) == 3 && f[1] == "team/a-db" && f[2] == "node-b":
			ownY++
		}
	}
	if ownX != 1 || ownY != 1 {
		t.Fatalf("authority Leases: want one per pair naming its writer, got:\n%s", leases)
	}
	mustQemuIO(t, vx.Status.Endpoint, "write -P 0x41 0 1M")
	mustQemuIO(t, vy.Status.Endpoint, "write -P 0x42 0 1M")

	// node-a's agent dies: x's writer is lost (Manual: waits for the
	// user), y only loses its backup.
	x.lc("kill-agent", "node-a")
	x.wait(60*time.Second, "team-a/db FailoverBlocked/ManualPolicy", func(vp *v1.VolumePair) bool {
		for _, c := range vp.Status.Conditions {
			if c.Type == v1.ConditionFailoverBlocked {
				return c.Status == "True" && c.Reason == "ManualPolicy"
			}
		}
		return false
	})
	if out, err := exec.Command(filepath.Join(bin, "kubectl-tandem"), "--kubeconfig", kubeconfig, "-n", "team-a", "failover", "db").CombinedOutput(); err != nil {
		t.Fatalf("kubectl tandem failover: %v\n%s", err, out)
	}
	vx = x.wait(60*time.Second, "team-a/db failed over on request", func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == "node-b" && vp.Status.Epoch == 2 && vp.Status.Endpoint != ""
	})
	vy = y.get()
	if vy.Status.ActivePrimary != "node-b" || vy.Status.Epoch != 1 || vy.Status.LastFailoverTime != nil {
		t.Fatalf("team/a-db's writer moved with team-a/db's failover: %+v", vy.Status)
	}
	mustQemuIO(t, vx.Status.Endpoint, "read -P 0x41 0 1M", "write -P 0x43 1M 1M")
	mustQemuIO(t, vy.Status.Endpoint, "read -P 0x42 0 1M", "write -P 0x44 1M 1M")

	x.lc("start-agent", "node-a")
	x.wait(90*time.Second, "team-a/db NORMAL (failback is Manual)", func(vp *v1.VolumePair) bool {
		return vp.Status.Phase == v1.PhaseNormal && inSync("node-b")(vp)
	})
	y.wait(90*time.Second, "team/a-db back in sync", inSync("node-b"))

	// Deleting one pair leaves the other's authority and data alone.
	mustKubectl(t, "delete", "vp", "db", "-n", "team-a", "--wait=true", "--timeout=60s")
	time.Sleep(2 * time.Second)
	vy = y.wait(30*time.Second, "team/a-db still in sync", inSync("node-b"))
	if vy.Status.Epoch != 1 {
		t.Fatalf("team/a-db after team-a/db was deleted: %+v", vy.Status)
	}
	mustQemuIO(t, vy.Status.Endpoint, "read -P 0x44 1M 1M", "write -P 0x45 2M 1M")
	y.identical("node-b", "node-a")
}

// Story 13: the automatic failback of a pair whose acting primary serves a
// steady client load (fio, 400 writes a second, through the acting
// primary's export, a connection that stays open across the switch)
// completes within seconds, holds writes for under a second, and the client
// sees no error and loses no write (fio verifies every block it wrote).
func TestStory13FailbackUnderLoad(t *testing.T) {
	for _, mode := range []string{"Async", "Sync"} {
		t.Run(mode, func(t *testing.T) {
			s := newStory(t, "load-"+strings.ToLower(mode))
			s.apply(s.pairManifest(mode, "node-a", "node-b", "128Mi", "  failback: {policy: Automatic}\n"))
			vp := s.wait(60*time.Second, "PAIR", inSync("node-a"))
			mustQemuIO(t, vp.Status.Endpoint, "write -P 0x51 0 16M")
			s.lc("kill-node", "node-a")
			vp = s.wait(60*time.Second, "SWAP, node-b serving", func(vp *v1.VolumePair) bool {
				return vp.Status.ActivePrimary == "node-b" && vp.Status.Endpoint != "" && condTrue(vp, v1.ConditionReady)
			})
			if mode == "Sync" {
				// Writes wait until node-a is recorded Outdated.
				mustQemuIO(t, vp.Status.Endpoint, "write -P 0x52 16M 1M")
			}

			// fio writes 4 KiB blocks at 400/s for 25 s over 32 MiB, then
			// reads every block back and checks it (crc32c + fio's header).
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			fio := exec.CommandContext(ctx, "fio", "--name=failback", "--ioengine=nbd", "--uri="+vp.Status.Endpoint,
				"--rw=randwrite", "--bs=4k", "--iodepth=4", "--offset=32m", "--size=32m", "--rate_iops=400", "--number_ios=10000",
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json", "--thread")
			fio.Dir = t.TempDir()
			var out, errb bytes.Buffer
			fio.Stdout, fio.Stderr = &out, &errb
			if err := fio.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second) // fio is writing through node-b
			s.lc("restore-node", "node-a")
			restored := time.Now()
			s.wait(90*time.Second, "failback to node-a under load", func(vp *v1.VolumePair) bool {
				return vp.Status.ActivePrimary == "node-a" && vp.Status.Epoch == 3
			})
			failback := time.Since(restored)
			ferr := fio.Wait()
			if ferr != nil || strings.Contains(errb.String(), "error") {
				t.Fatalf("fio saw an error: %v\n%s\n%s", ferr, errb.String(), tail(out.String(), 40))
			}
			var res struct {
				Jobs []struct {
					Error int `json:"error"`
					Write struct {
						TotalIOs int64 `json:"total_ios"`
						ClatNs   struct {
							Max float64 `json:"max"`
						} `json:"clat_ns"`
					} `json:"write"`
				} `json:"jobs"`
			}
			if err := json.Unmarshal(jsonPart(out.Bytes()), &res); err != nil || len(res.Jobs) != 1 {
				t.Fatalf("fio output: %v\n%s", err, out.String())
			}
			job := res.Jobs[0]
			hold := s.agentStatus("node-b").LastHoldSeconds
			ev := mustKubectl(t, "get", "events", "-n", s.ns)
			released := strings.Count(ev, "FailbackHoldReleased")
			maxLat := time.Duration(job.Write.ClatNs.Max)
			t.Logf("STORY 13 %s failback under load: node-a restored → writer again in %.2fs (resync included); hold %.3fs; fio %d writes, slowest %v, error %d; holds released without a switch: %d",
				mode, failback.Seconds(), hold, job.Write.TotalIOs, maxLat.Round(time.Millisecond), job.Error, released)
			if job.Error != 0 {
				t.Fatalf("fio job error %d", job.Error)
			}
			if failback > 20*time.Second {
				t.Errorf("failback took %v under load", failback)
			}
			if hold <= 0 || hold > 1 {
				t.Errorf("failback write hold %.3fs, want ≤ 1 s", hold)
			}
			if maxLat > 2*time.Second {
				t.Errorf("a write took %v across the failback", maxLat)
			}
			s.identical("node-a", "node-b")
		})
	}
}

// jsonPart is fio's JSON report without the lines fio prints around it.
func jsonPart(b []byte) []byte {
	i, j := bytes.IndexByte(b, '{'), bytes.LastIndexByte(b, '}')
	if i < 0 || j < i {
		return nil
	}
	return b[i : j+1]
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
