// Command bench measures Tandem against real peers on this machine in one
// run and writes docs/benchmarks.md and docs/benchmarks.png (`make bench`):
//
//   - fio (ioengine=nbd) through nbdkit's file plugin, a standalone Tandem
//     member, an Async pair and a Sync pair, targets alternated round by round;
//   - resync (COPY) after 0.1/1/10 % of a 4 GiB volume changed during SWAP,
//     against a full nbdcopy between the same two nodes, also with the
//     returning member's own diff merged in;
//   - failover (the controllers' envtest benchmark, default and tight
//     settings) and the failback write hold;
//   - the bitmap micro-benchmarks, agent RSS with 1/16/64 volumes, and how
//     IOPS and resync time scale with the volume size.
//
// Each agent is a separate process on loopback (one per simulated node), as
// in hack/fio-compare.sh. Every figure is the median of -runs runs with
// min–max. Nothing here fails on a number: a benchmark, not a test.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// regionSize of every benchmark volume (the default).
const regionSize = 64 << 10

type bench struct {
	root      string // repository
	work      string
	agentBin  string
	tokenFile string
	runs      int
	runtime   time.Duration
	syncRuns  bool
	baseBin   string // -compare: agent binary of the baseline
	tmpfs     bool   // -tmpfs: the fio section's replicas on a tmpfs
	pin       bool   // -pin: the fio section's primary side on CPU 0, backup side on CPU 1
	netns     bool   // -netns: the fio section's two sides in two network namespaces over a bridge
	inVariant bool   // the fio section being run is one of -variants
	mu        sync.Mutex
	procs     []*agentProc
	nbdkits   []*nbdkitProc
	qemus     []*qemuMirror
	mounts    []string // tmpfs mount points to unmount in cleanup
	start     time.Time
	res       results
	logf      *os.File

	// precondition: write each fio target's volume once before measuring.
	precondition bool
	// workloads and targets select part of the fio section (empty: all).
	workloads, targets []string

	// netnsCreated: the -netns bridge and namespaces may exist (cleanup
	// removes them).
	netnsCreated bool
}

func main() {
	b := &bench{start: time.Now()}
	out := flag.String("out", "docs/benchmarks.md", "Markdown report to write (the PNG goes next to it).")
	flag.IntVar(&b.runs, "runs", 5, "Runs per figure (median, min, max).")
	flag.DurationVar(&b.runtime, "runtime", 3*time.Second, "Measured time of each fio run (plus 1 s ramp).")
	flag.BoolVar(&b.syncRuns, "sync", true, "Flush the page cache's dirty data (sync) before each fio run, so no run pays for another's writeback.")
	only := flag.String("only", "", "Comma-separated sections to run (fio,resync,failover,failback,bitmaps,rss,scaling,backups,thirdresync,podfailover); empty: all. podfailover needs root and brings the local cluster up. With -tmpfs, -netns or -pin, fio runs as fio-tmpfs, fio-netns, fio-pinned, fio-tmpfs-netns-pinned, ... (its own results).")
	update := flag.Bool("update", false, "Start from the results of the last run (the .json next to -out) and replace only the sections run now, e.g. -only podfailover -update.")
	keep := flag.Bool("keep", false, "Keep the work directory.")
	from := flag.String("from", "", "Only write the report (and plot) again from the results of an earlier run (the .json next to the report), e.g. after editing hack/bench/analysis.md.")
	compare := flag.String("compare", "", "Git revision whose agent runs as extra fio targets (standalone-base, async-base, sync-base), for before/after figures; implies -only fio unless -only is set.")
	flag.BoolVar(&b.tmpfs, "tmpfs", false, "Put the data of every fio target (nbdkit's file, the qemu mirror's files, each agent's data directory) on a tmpfs the harness mounts under its work directory (root); the results go to their own section (fio-tmpfs), beside the on-disk ones.")
	flag.BoolVar(&b.pin, "pin", false, "Pin the fio targets' primary side (nbdkit, standalone and primary agents, qemu-storage-daemon) to CPU 0 and the backup side (backup agent, the mirror's nbdkit) to CPU 1, fio unpinned: two nodes on two CPUs; the results go to their own section (fio-pinned).")
	flag.BoolVar(&b.netns, "netns", false, "Run the fio targets' primary side (nbdkit, standalone and primary agents, qemu-storage-daemon) in a network namespace ("+netnsPrimary+", "+netnsAddrA+") and the backup side (backup agent, the mirror's nbdkit) in another ("+netnsBackup+", "+netnsAddrB+"), each with a veth into a bridge ("+netnsBridge+", "+netnsBridgeAddr+"), fio in the harness's namespace: the topology of a pair on the local cluster (root; everything is removed afterwards); the results go to their own section (fio-netns), beside the loopback ones.")
	flag.BoolVar(&b.precondition, "precondition", false, "Write every fio target's volume once end to end (and wait for its replicas) before the first measured run, so that no run pays the file system's first allocation of a sparse file's blocks.")
	variantsFlag := flag.String("variants", "default", "Comma-separated fio variants to run after the main fio section in the same run, each into its own section beside it: tmpfs, netns, pin, or several joined by + (tmpfs+pin); none for none. default: tmpfs when run as root (it mounts a tmpfs) on a run of the main fio section (not with -compare, -workloads or -targets), none otherwise.")
	wl := flag.String("workloads", "", "Comma-separated fio workloads to run (a prefix of the name, e.g. 4K,1M); empty: all. For quick experiments: refused with -update, whose section would lose the others.")
	tg := flag.String("targets", "", "Comma-separated fio targets to run (e.g. async,qemu-async); empty: all. For quick experiments: refused with -update.")
	flag.Parse()
	b.workloads, b.targets = splitList(*wl), splitList(*tg)
	if *update && (len(b.workloads) > 0 || len(b.targets) > 0) {
		fatal(fmt.Errorf("-workloads and -targets run part of the fio section: write it elsewhere (-out /tmp/x.md), not with -update"))
	}
	if b.netns && os.Geteuid() != 0 {
		fatal(fmt.Errorf("-netns creates network namespaces and a bridge: run it as root (sudo)"))
	}
	variants, err := parseVariants(*variantsFlag, variantDefaults{
		root: os.Geteuid() == 0, variant: b.tmpfs || b.netns || b.pin,
		partial: *compare != "" || len(b.workloads) > 0 || len(b.targets) > 0})
	if err != nil {
		fatal(err)
	}
	if len(variants) > 0 && (b.tmpfs || b.netns || b.pin) {
		fatal(fmt.Errorf("-variants runs after the main fio section: not with -tmpfs, -netns or -pin (run -only fio -variants %s)", *variantsFlag))
	}
	for _, v := range variants {
		if (v.tmpfs || v.netns) && os.Geteuid() != 0 {
			fatal(fmt.Errorf("-variants %s mounts a tmpfs or creates network namespaces: run it as root (sudo), or -variants none", v))
		}
	}

	root, err := os.Getwd()
	if err != nil {
		fatal(err)
	}
	b.root = root
	b.work, err = os.MkdirTemp("", "tandem-bench-")
	if err != nil {
		fatal(err)
	}
	b.logf, err = os.Create(filepath.Join(b.work, "bench.log"))
	if err != nil {
		fatal(err)
	}
	finish := func() {
		b.cleanup()
		if *keep {
			fmt.Fprintf(os.Stderr, "bench: work directory kept: %s\n", b.work)
			return
		}
		// Freeing several GiB of written blocks takes minutes on a file
		// system mounted with online discard: do it in the background.
		rm := exec.Command("rm", "-rf", b.work)
		rm.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := rm.Start(); err != nil {
			_ = os.RemoveAll(b.work)
			return
		}
		fmt.Fprintf(os.Stderr, "bench: removing the work directory %s in the background (pid %d)\n", b.work, rm.Process.Pid)
	}
	b.finishOnSignal(finish)
	defer finish()
	if *from != "" {
		data, err := os.ReadFile(*from)
		if err != nil {
			fatal(err)
		}
		if err := json.Unmarshal(data, &b.res); err != nil {
			fatal(fmt.Errorf("%s: %w", *from, err))
		}
		if err := b.report(*out); err != nil {
			fatal(err)
		}
		b.logln("wrote %s from %s", *out, *from)
		return
	}
	for _, c := range []string{"fio", "nbdkit", "nbdcopy", "gnuplot"} {
		if _, err := exec.LookPath(c); err != nil {
			fatal(fmt.Errorf("%s is missing (make bench installs it)", c))
		}
	}
	b.tokenFile = filepath.Join(b.work, "token")
	if err := os.WriteFile(b.tokenFile, []byte(token), 0o600); err != nil {
		fatal(err)
	}
	b.agentBin = filepath.Join(b.work, "agent")
	b.logln("building the agent")
	if out, err := exec.Command("go", "build", "-o", b.agentBin, "./cmd/agent").CombinedOutput(); err != nil {
		fatal(fmt.Errorf("go build ./cmd/agent: %v\n%s", err, out))
	}
	if *compare != "" {
		if err := b.buildBaseline(*compare); err != nil {
			fatal(err)
		}
		if *only == "" {
			*only = "fio"
		}
	}
	if *update {
		data, err := os.ReadFile(strings.TrimSuffix(*out, filepath.Ext(*out)) + ".json")
		if err != nil {
			fatal(fmt.Errorf("-update: %w", err))
		}
		if err := json.Unmarshal(data, &b.res); err != nil {
			fatal(fmt.Errorf("-update: %w", err))
		}
	} else {
		b.res.Machine = machineInfo()
		b.res.Started = b.start
		b.res.Runs, b.res.Runtime = b.runs, b.runtime
	}

	want := map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		if s = strings.TrimSpace(s); s != "" {
			want[s] = true
		}
	}
	if err := missingEnvtest(b.root, want); err != nil {
		fatal(err)
	}
	sections := []struct {
		name string
		fn   func() error
	}{
		{"fio", b.runFio},
		{"resync", b.runResync},
		{"scaling", b.runScaling},
		{"failback", b.runFailback},
		{"rss", b.runRSS},
		{"bitmaps", b.runBitmaps},
		{"failover", b.runFailover},
		{"backups", b.runBackups},
		{"thirdresync", b.runThirdResync},
		{"podfailover", b.runPodFailover},
	}
	for _, s := range sections {
		if len(want) > 0 && !want[s.name] && !(s.name == "fio" && want[b.fioKey()]) {
			continue
		}
		if s.name == "fio" {
			s.name = b.fioKey() // fio-tmpfs, fio-netns, fio-pinned: a section of their own
		}
		b.runSection(s.name, s.fn)
		if s.name != "fio" {
			continue
		}
		// The variants, in the same run: their own sections, beside it.
		for _, v := range variants {
			b.tmpfs, b.netns, b.pin, b.inVariant = v.tmpfs, v.netns, v.pin, true
			b.runSection(b.fioKey(), b.runFio)
			b.tmpfs, b.netns, b.pin, b.inVariant = false, false, false, false
		}
	}
	if !*update {
		b.res.Finished = time.Now()
		b.res.Machine.LoadAfter = loadAvg()
	}
	data, err := json.MarshalIndent(&b.res, "", "  ")
	if err != nil {
		fatal(err)
	}
	if err := os.WriteFile(strings.TrimSuffix(*out, filepath.Ext(*out))+".json", append(data, '\n'), 0o644); err != nil {
		fatal(err)
	}
	if err := b.report(*out); err != nil {
		fatal(err)
	}
	b.logln("wrote %s in %v", *out, time.Since(b.start).Round(time.Second))
}

// buildBaseline builds the agent of a git revision (exported into the work
// directory) for -compare.
func (b *bench) buildBaseline(rev string) error {
	wt := filepath.Join(b.work, "baseline-src")
	if err := os.MkdirAll(wt, 0o700); err != nil {
		return err
	}
	if out, err := exec.Command("sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", rev, wt).CombinedOutput(); err != nil {
		return fmt.Errorf("git archive %s: %v: %s", rev, err, out)
	}
	b.baseBin = filepath.Join(b.work, "agent-base")
	cmd := exec.Command("go", "build", "-o", b.baseBin, "./cmd/agent")
	cmd.Dir = wt
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build the %s agent: %v\n%s", rev, err, out)
	}
	b.res.Baseline = rev
	return nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// runSection runs one section, records how long it took and whether it
// failed, and stops what it started.
func (b *bench) runSection(name string, fn func() error) {
	t0 := time.Now()
	b.logln("== %s", name)
	b.res.forget(name)
	err := fn()
	d := time.Since(t0)
	b.res.Sections = slices.DeleteFunc(b.res.Sections, func(t sectionTime) bool { return t.Name == name })
	b.res.Sections = append(b.res.Sections, sectionTime{Name: name, Seconds: d.Seconds(), Err: errString(err)})
	if err != nil {
		b.logln("%s failed after %v: %v", name, d.Round(time.Second), err)
	} else {
		b.logln("%s done in %v", name, d.Round(time.Second))
	}
	b.cleanup()
}

// cleanup stops every process a section started, unmounts its tmpfs and
// removes its network namespaces and bridge.
func (b *bench) cleanup() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, a := range b.procs {
		a.stop()
	}
	b.procs = nil
	for _, q := range b.qemus {
		q.stop()
	}
	b.qemus = nil
	for _, n := range b.nbdkits {
		n.stop()
	}
	b.nbdkits = nil
	for _, m := range b.mounts {
		if err := unmount(m); err != nil {
			b.logln("%v", err)
		}
	}
	b.mounts = nil
	b.netnsDown() // once every process in the namespaces is gone
}

// finishOnSignal runs finish (stop the processes, unmount the tmpfs,
// remove the namespaces, remove the work directory) when the run is
// interrupted: the processes would die with the harness, the mount and
// the namespaces would stay.
func (b *bench) finishOnSignal(finish func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		sig := <-ch
		b.logln("%v: cleaning up", sig)
		finish()
		os.Exit(1)
	}()
}

func (b *bench) logln(format string, args ...any) {
	line := fmt.Sprintf("[%6.1fs] ", time.Since(b.start).Seconds()) + fmt.Sprintf(format, args...)
	fmt.Fprintln(os.Stderr, line)
	if b.logf != nil {
		fmt.Fprintln(b.logf, line)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "bench: %v\n", err)
	os.Exit(1)
}

// syncAll flushes dirty pages (every file system), so that a run does not
// pay for the writeback of the previous one.
func (b *bench) syncAll() {
	if b.syncRuns {
		_ = exec.Command("sync").Run()
	}
}

// Machine describes where the figures were taken.
type Machine struct {
	CPU, Kernel, Go, Fio, Nbdkit, Disk string
	Qemu                               string `json:",omitempty"` // qemu-storage-daemon --version
	CPUs                               int
	MemGiB                             float64
	LoadBefore, LoadAfter              string
}

func machineInfo() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), LoadBefore: loadAvg()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb float64
		if _, err := fmt.Sscanf(string(data), "MemTotal: %f kB", &kb); err == nil {
			m.MemGiB = kb / (1 << 20)
		}
	}
	m.Kernel = cmdOut("uname", "-sr")
	m.Fio = cmdOut("fio", "--version")
	m.Nbdkit = cmdOut("nbdkit", "--version")
	if _, err := exec.LookPath("qemu-storage-daemon"); err == nil {
		m.Qemu = cmdOut("qemu-storage-daemon", "--version")
	}
	m.Disk = cmdOut("sh", "-c", `d=$(df --output=source "${TMPDIR:-/tmp}" | tail -1); fs=$(df --output=fstype "${TMPDIR:-/tmp}" | tail -1); n=$(basename "$d"); r=$(cat /sys/block/$n/queue/rotational 2>/dev/null); echo "$d ($fs, rotational=$r)"`)
	return m
}

func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func cmdOut(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// envtestSections run `go test` benchmarks against an API server and etcd
// from bin/ (KUBEBUILDER_ASSETS).
var envtestSections = []string{"failover"}

// missingEnvtest says which of bin/'s envtest binaries a run that wants
// these sections (none named: all) lacks, before the run spends half an
// hour on the others and then records the section as failed.
func missingEnvtest(root string, want map[string]bool) error {
	needed := len(want) == 0
	for _, s := range envtestSections {
		needed = needed || want[s]
	}
	if !needed {
		return nil
	}
	var missing []string
	for _, t := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(root, "bin", t)); err != nil {
			missing = append(missing, "bin/"+t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the %s section needs %s (make bench builds them; or make tools)", strings.Join(envtestSections, ", "), strings.Join(missing, " and "))
	}
	return nil
}
