package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestFioKeys: every combination of -tmpfs, -netns and -pin has a results
// key of its own, and the report knows each one.
func TestFioKeys(t *testing.T) {
	seen := map[string]bool{}
	for _, tmpfs := range []bool{false, true} {
		for _, netns := range []bool{false, true} {
			for _, pin := range []bool{false, true} {
				k := fioKeyOf(tmpfs, netns, pin)
				if seen[k] {
					t.Fatalf("key %s twice", k)
				}
				seen[k] = true
				if k != "fio" && !slices.Contains(fioVariantKeys, k) {
					t.Errorf("%s is not among fioVariantKeys %v", k, fioVariantKeys)
				}
			}
		}
	}
	if got := fioKeyOf(true, true, true); got != "fio-tmpfs-netns-pinned" {
		t.Errorf("all three: %s", got)
	}
	if len(fioVariantKeys) != 7 {
		t.Errorf("fioVariantKeys %v", fioVariantKeys)
	}
}

// TestNetnsPair: -netns's topology. A pair whose primary runs in one
// network namespace and whose backup runs in the other, as the fio section
// starts them, reaches sync over the bridge and replicates what is written
// through the primary's export from the harness's namespace; cleanup
// leaves no namespace or link behind. Root only, and it creates host-wide
// objects (a bridge, two namespaces): not under -short.
func TestNetnsPair(t *testing.T) {
	skipNetns(t)
	linksBefore := linkNames(t)
	b := &bench{work: t.TempDir(), netns: true, pin: true, start: time.Now()}
	withAgents(t, b)
	if err := b.netnsUp(); err != nil {
		t.Fatal(err)
	}
	pc, bc := b.sides()
	a, bk := b.newAgent("node-a"), b.newAgent("node-b")
	a.at, bk.at = pc, bc
	for _, ag := range []*agentProc{a, bk} {
		if err := ag.start(); err != nil {
			logFiles(t, b.work, "*.log")
			t.Fatal(err)
		}
		// nsenter and taskset exec'd: the pid the harness reads CPU time
		// from is the agent's, in its namespace, on its CPU.
		checkPlaced(t, ag.pid(), "agent", ag.at)
	}
	if !strings.HasPrefix(bk.repl, netnsAddrB+":") || !strings.HasPrefix(a.nbd, netnsAddrA+":") {
		t.Fatalf("advertised: primary's NBD %s, backup's replication %s", a.nbd, bk.repl)
	}
	const size = 16 << 20
	if err := pair(a, bk, "vol", size, agentapi.ModeSync, 1); err != nil {
		t.Fatal(err)
	}
	if err := testkit.Wait(30*time.Second, "pair in sync across the namespaces", inSync(a, bk, "vol")); err != nil {
		logFiles(t, b.work, "*.log")
		t.Fatal(err)
	}
	// The replication link is a connection from the primary's namespace
	// to the backup's address, as the backup's namespace sees it.
	if !established(t, bk.pid(), bk.repl, netnsAddrA) {
		t.Fatalf("no connection from %s to the backup's %s in its namespace", netnsAddrA, bk.repl)
	}

	pattern := make([]byte, size)
	_, _ = rand.Read(pattern)
	in, out := filepath.Join(b.work, "pattern"), filepath.Join(b.work, "readback")
	if err := os.WriteFile(in, pattern, 0o600); err != nil {
		t.Fatal(err)
	}
	if o, err := exec.Command("nbdcopy", "--flush", in, a.url("vol")).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy to %s: %v\n%s", a.url("vol"), err, o)
	}
	if err := testkit.Wait(30*time.Second, "pair in sync after the writes", inSync(a, bk, "vol")); err != nil {
		t.Fatal(err)
	}
	if o, err := exec.Command("nbdcopy", a.url("vol"), out).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy from %s: %v\n%s", a.url("vol"), err, o)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern) {
		t.Fatal("read back differs from what was written")
	}
	// The backup holds it too: promoted (the primary gone), it serves the
	// same bytes.
	a.kill()
	if err := bk.put("vol", size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 2, Mode: agentapi.ModeAsync}); err != nil {
		t.Fatal(err)
	}
	if o, err := exec.Command("nbdcopy", bk.url("vol"), out).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy from the promoted backup %s: %v\n%s", bk.url("vol"), err, o)
	}
	if got, err = os.ReadFile(out); err != nil || !bytes.Equal(got, pattern) {
		t.Fatalf("the promoted backup's data differs from what was written (%v)", err)
	}

	b.cleanup()
	checkNetnsGone(t, linksBefore)
}

// TestNetnsPeers: -netns's peers. nbdkit and the qemu mirror run across
// the two namespaces as the fio section starts them, each the very process
// the harness reads CPU time from (nsenter and taskset exec), and the
// mirror replicates over the bridge. Root only, not under -short.
func TestNetnsPeers(t *testing.T) {
	skipNetns(t, "qemu-storage-daemon", "nbdkit")
	linksBefore := linkNames(t)
	b := &bench{work: t.TempDir(), netns: true, pin: true, start: time.Now()}
	t.Cleanup(b.cleanup)
	if err := b.netnsUp(); err != nil {
		t.Fatal(err)
	}
	pc, bc := b.sides()
	nk, err := b.startNbdkitOn(filepath.Join(b.work, "disk.img"), 1<<20, pc)
	if err != nil {
		logFiles(t, b.work, "*.log")
		t.Fatal(err)
	}
	checkPlaced(t, nk.cmd.Process.Pid, "nbdkit", pc)
	const size = 16 << 20
	q, err := b.startQemuMirror(filepath.Join(b.work, "mirror"), size, mirrorWriteBlocking, pc, bc)
	if err != nil {
		logFiles(t, b.work, "*.log")
		t.Fatal(err)
	}
	checkPlaced(t, q.cmd.Process.Pid, "qemu-storage-da", pc) // comm: 15 characters
	checkPlaced(t, q.backup.cmd.Process.Pid, "nbdkit", bc)
	if !strings.HasPrefix(q.addr, netnsAddrA+":") || !strings.HasPrefix(q.backup.addr, netnsAddrB+":") {
		t.Errorf("qemu-storage-daemon's export at %s, its target at %s", q.addr, q.backup.addr)
	}
	// Sockets opened in the namespaces do not cost the processes started
	// before them their lives (a thread that exits kills the children it
	// forked: Pdeathsig).
	for range 100 {
		for _, at := range []place{pc, bc} {
			if _, err := at.freePort(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, exited := range map[string]chan struct{}{"nbdkit": nk.exited, "qemu-storage-daemon": q.exited, "the mirror's nbdkit": q.backup.exited} {
		if !processAlive(exited) {
			t.Fatalf("%s died", name)
		}
	}
	pattern := make([]byte, size)
	_, _ = rand.Read(pattern)
	in := filepath.Join(b.work, "pattern")
	if err := os.WriteFile(in, pattern, 0o600); err != nil {
		t.Fatal(err)
	}
	if o, err := exec.Command("nbdcopy", in, q.url()).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy to %s: %v\n%s", q.url(), err, o)
	}
	if err := q.healthy(); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(b.work, "mirror", "backup.img")); err != nil || !bytes.Equal(got, pattern) {
		t.Fatalf("the mirror's backup differs from what was written (%v)", err)
	}
	if !established(t, q.backup.cmd.Process.Pid, q.backup.addr, netnsAddrA) {
		t.Errorf("no connection from %s to the mirror's target %s in its namespace", netnsAddrA, q.backup.addr)
	}
	b.cleanup()
	checkNetnsGone(t, linksBefore)
}

// skipNetns skips a test of -netns's topology unless it can run: root,
// not -short (it creates host-wide objects), ip, nsenter, taskset,
// nbdcopy and the commands named installed.
func skipNetns(t *testing.T, commands ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("creates network namespaces and a bridge; not under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	for _, c := range append([]string{"ip", "nsenter", "taskset", "nbdcopy"}, commands...) {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("%s not installed", c)
		}
	}
}

// checkNetnsGone fails if a namespace of -netns is left, or the links
// differ from links (before the test).
func checkNetnsGone(t *testing.T, links []string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "list").Output(); err != nil || strings.Contains(string(out), "tbench") {
		t.Errorf("namespaces left: %q (%v)", out, err)
	}
	if after := linkNames(t); !slices.Equal(after, links) {
		t.Errorf("links before %v, after %v", links, after)
	}
}

// linkNames are the names of the harness namespace's links, sorted.
func linkNames(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			names = append(names, strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":"))
		}
	}
	slices.Sort(names)
	return names
}

// checkPlaced fails unless pid is the command name itself (not a wrapper),
// in at's network namespace, allowed only on at's CPUs.
func checkPlaced(t *testing.T, pid int, name string, at place) {
	t.Helper()
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(comm)); got != name {
		t.Errorf("pid %d is %q, not %s: a wrapper forked", pid, got, name)
	}
	var want, got os.FileInfo
	if want, err = os.Stat(netnsPath(at.netns)); err == nil {
		got, err = os.Stat(fmt.Sprintf("/proc/%d/ns/net", pid))
	}
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(want, got) {
		t.Errorf("pid %d is not in the network namespace %s", pid, at.netns)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok && strings.TrimSpace(v) != at.cpu {
			t.Errorf("pid %d runs on CPUs %s, not %s", pid, strings.TrimSpace(v), at.cpu)
		}
	}
}

// established reports whether the network namespace of pid has an
// established TCP connection from host remote to local (/proc/PID/net/tcp
// is the table of the process's namespace).
func established(t *testing.T, pid int, local, remote string) bool {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) < 4 || f[3] != "01" { // TCP_ESTABLISHED
			continue
		}
		if procAddr(f[1]) == local && strings.HasPrefix(procAddr(f[2]), remote+":") {
			return true
		}
	}
	return false
}

// procAddr decodes an address of /proc/net/tcp (little-endian hex IPv4,
// hex port).
func procAddr(s string) string {
	h, p, ok := strings.Cut(s, ":")
	ip, err := hex.DecodeString(h)
	port, perr := strconv.ParseUint(p, 16, 16)
	if !ok || err != nil || perr != nil || len(ip) != 4 {
		return ""
	}
	return net.JoinHostPort(net.IPv4(ip[3], ip[2], ip[1], ip[0]).String(), strconv.Itoa(int(port)))
}

// TestParseVariants: -variants, and what its default means for a run.
func TestParseVariants(t *testing.T) {
	full := variantDefaults{root: true}
	for _, tc := range []struct {
		in      string
		d       variantDefaults
		want    []string // fio keys
		wantErr string
	}{
		{in: "default", d: full, want: []string{"fio-tmpfs"}},
		{in: "default", d: variantDefaults{}, want: nil},                          // not root
		{in: "default", d: variantDefaults{root: true, partial: true}, want: nil}, // -compare, -workloads, -targets
		{in: "default", d: variantDefaults{root: true, variant: true}, want: nil}, // -tmpfs etc.
		{in: "none", d: full, want: nil},
		{in: "", d: full, want: nil},
		{in: "tmpfs,pin,netns", d: variantDefaults{}, want: []string{"fio-tmpfs", "fio-pinned", "fio-netns"}},
		{in: " tmpfs+pin , netns+tmpfs ", d: full, want: []string{"fio-tmpfs-pinned", "fio-tmpfs-netns"}},
		{in: "tmpfs,ramdisk", d: full, wantErr: `"ramdisk" is not a variant`},
		{in: "tmpfs,", d: full, wantErr: `"" is not a variant`},
		{in: "pin,pin", d: full, wantErr: "pin twice"},
	} {
		got, err := parseVariants(tc.in, tc.d)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: error %v, want one saying %s", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		var keys []string
		for _, v := range got {
			keys = append(keys, fioKeyOf(v.tmpfs, v.netns, v.pin))
		}
		if !slices.Equal(keys, tc.want) {
			t.Errorf("%q (%+v): %v, want %v", tc.in, tc.d, keys, tc.want)
		}
	}
}
