package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

type results struct {
	Baseline          string // -compare revision
	Targets           []string
	Machine           Machine
	Started, Finished time.Time
	Runs              int
	Runtime           time.Duration
	Sections          []sectionTime

	// FioEnv is how Fio was taken (zero in results from before it: on
	// disk, unpinned, after a 1 s ramp).
	FioEnv fioEnv `json:",omitzero"`
	Fio    []fioRow
	// FioVariants are the fio sections taken with -tmpfs, -netns or -pin,
	// by section name (fioVariantKeys), kept beside the main one.
	FioVariants map[string]*fioSet `json:",omitempty"`
	Profiles    []profile
	Resync      []resyncRow
	FullCopy    resyncRow
	Scaling     []scaleRow
	Failback    failbackRes
	RSS         []rssRow
	Bitmaps     []benchLine
	Failover    []benchLine
	Backups     []backupsRow
	ThirdResync thirdResync
	// PodFailover is measured on the local cluster (-only podfailover).
	PodFailover podFailoverRes
	Raw         map[string]string `json:"-"` // raw output of the go benchmarks, by section
}

type sectionTime struct {
	Name    string
	Seconds float64
	Err     string
}

// fioEnv is how a fio section was taken.
type fioEnv struct {
	Storage string `json:",omitempty"` // where every replica's data was: disk or tmpfs
	Pinning string `json:",omitempty"` // empty: unpinned
	Network string `json:",omitempty"` // empty: every process on loopback; networkNetns
	// NoRamp: runs measured from their first I/O, without a ramp, so that
	// the CPU time and the bytes written cover the same interval.
	NoRamp bool `json:",omitempty"`
	// Preconditioned: every target's volume was written once end to end
	// before the first measured run (precondition).
	Preconditioned bool `json:",omitempty"`
	// Variant: a variant section taken in the same run as the main fio
	// section (-variants), not on its own with -only fio -tmpfs etc.
	Variant bool          `json:",omitempty"`
	Runs    int           `json:",omitempty"`
	Runtime time.Duration `json:",omitempty"`
	Started time.Time     `json:",omitzero"`
}

// fioSet is one fio section: how it was taken, its targets, its rows.
type fioSet struct {
	fioEnv
	Targets []string
	Rows    []fioRow
}

// fioVariantKeys are the fio sections besides the main one, in report
// order: on loopback (fio-tmpfs, fio-pinned, fio-tmpfs-pinned), then in
// two network namespaces (fio-netns, fio-tmpfs-netns, ...).
var fioVariantKeys = func() []string {
	var keys []string
	for _, netns := range []bool{false, true} {
		for _, c := range []struct{ tmpfs, pin bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
			if k := fioKeyOf(c.tmpfs, netns, c.pin); k != "fio" {
				keys = append(keys, k)
			}
		}
	}
	return keys
}()

// namedFioSet is a fio section with its results key.
type namedFioSet struct {
	Key string
	Set *fioSet
}

// fioSets are the results' fio sections, the main one (key fio) first;
// sections without rows are left out.
func (r *results) fioSets() []namedFioSet {
	main := &fioSet{fioEnv: r.FioEnv, Targets: r.Targets, Rows: r.Fio}
	if main.Storage == "" {
		main.Storage = storageDisk
	}
	if main.Runs == 0 {
		main.Runs, main.Runtime = r.Runs, r.Runtime
	}
	var out []namedFioSet
	for _, n := range append([]namedFioSet{{"fio", main}}, variants(r.FioVariants)...) {
		if n.Set != nil && len(n.Set.Rows) > 0 {
			out = append(out, n)
		}
	}
	return out
}

func variants(m map[string]*fioSet) []namedFioSet {
	var out []namedFioSet
	for _, k := range fioVariantKeys {
		out = append(out, namedFioSet{k, m[k]})
	}
	return out
}

// setFio stores a fio section under its key.
func (r *results) setFio(key string, s *fioSet) {
	if key == "fio" {
		r.FioEnv, r.Targets, r.Fio = s.fioEnv, s.Targets, s.Rows
		return
	}
	if r.FioVariants == nil {
		r.FioVariants = map[string]*fioSet{}
	}
	r.FioVariants[key] = s
}

type fioRow struct {
	Workload, Target string
	IOPS, MiBs       stat
	P50, P99         stat // µs
	Ratio            stat // IOPS ÷ nbdkit IOPS of the same round
	// QemuRatio is IOPS ÷ the qemu mirror's of the same kind (sync:
	// write-blocking, async: background) in the same round.
	QemuRatio stat `json:",omitzero"`
	// CPU is the CPU seconds (utime+stime of all the target's processes)
	// per GiB written (read, for a read-only workload).
	CPU stat `json:",omitzero"`
	// CPUDurable adds the work of making every replica's data durable:
	// the kernel's writeback threads during the run and an fdatasync of
	// every replica file after it (cpuUse).
	CPUDurable stat `json:",omitzero"`
	Errors     []string
}

type profile struct {
	Workload, Side, Top string
}

var workloads = []workload{
	{name: "4K randwrite QD32", rw: "randwrite", bs: "4k", qd: 32},
	{name: "1M seq write QD8", rw: "write", bs: "1M", qd: 8},
	{name: "64K randrw 70/30 QD16", rw: "randrw", bs: "64k", qd: 16, mixed: true},
	{name: "4K randread QD32", rw: "randread", bs: "4k", qd: 32, isRead: true},
}

// targets of the fio section, each peer next to its Tandem counterpart.
// async-tls and sync-tls are the pairs again with mutual TLS (a second pair
// of agents with --tls-dir), for the TLS cost table.
var targets = []string{"nbdkit", "standalone", "async", "async-tls", "qemu-async", "sync", "sync-tls", "qemu-sync"}

// wantsTLS reports whether a target list (empty: all) has a TLS target.
func wantsTLS(list []string) bool {
	return len(list) == 0 || slices.Contains(list, "async-tls") || slices.Contains(list, "sync-tls")
}

// fioWantsTLS says whether this fio section runs the TLS pairs: asked for
// by name, or every target of the main section (the TLS cost is measured
// there; a variant -tmpfs, -netns or -pin runs them only when named).
func (b *bench) fioWantsTLS() bool {
	return wantsTLS(b.targets) && (len(b.targets) > 0 || b.fioKey() == "fio")
}

// qemuPeer is the qemu mirror target a Tandem target is compared with:
// write-blocking for Sync, background for Async ("" for none).
func qemuPeer(target string) string {
	switch {
	case strings.HasPrefix(target, "sync"):
		return "qemu-sync"
	case strings.HasPrefix(target, "async"):
		return "qemu-async"
	}
	return ""
}

const fioVolSize = 1 << 30

// fioTarget is one target of the fio section.
type fioTarget struct {
	name string
	uri  string
	// pids are the processes whose CPU time the target costs.
	pids func() []int
	// prepare, before a run, restarts what died (nil: nothing).
	prepare func() error
	// check, after a run, reports an error if the replication broke.
	check func() error
	// drained, after a run, reports whether every replica holds every
	// write (nil: no replica).
	// files are the target's data on every replica (files or directories),
	// synced after a run for the CPU until durable.
	drained func() (bool, error)
	files   func() []string
}

// runFio measures the targets on each workload, rotating the order round
// by round (A B C D, B C D A, ...); in the main section it then takes CPU
// profiles of both agents during one extra Async-pair run of each workload.
func (b *bench) runFio() error {
	key := b.fioKey()
	set := &fioSet{fioEnv: fioEnv{Storage: storageDisk, NoRamp: true, Preconditioned: b.precondition, Variant: b.inVariant, Runs: b.runs, Runtime: b.runtime, Started: time.Now()}}
	if b.tmpfs {
		set.Storage = storageTmpfs
	}
	if b.pin {
		set.Pinning = pinningSides
	}
	if b.netns {
		set.Network = networkNetns
	}
	defer b.res.setFio(key, set)  // what was measured, also if a later step fails
	if b.res.Machine.Qemu == "" { // -update of results from before the qemu targets
		b.res.Machine.Qemu = cmdOut("qemu-storage-daemon", "--version")
	}
	if key == "fio" {
		b.res.Profiles = nil
	}
	ts, a, bk, err := b.fioTargets()
	if err != nil {
		return err
	}
	for _, t := range ts {
		set.Targets = append(set.Targets, t.name)
	}
	if b.precondition {
		for _, t := range ts {
			if err := b.preconditionTarget(t); err != nil {
				return err
			}
		}
	}
	for _, w := range workloads {
		if len(b.workloads) > 0 && !slices.ContainsFunc(b.workloads, func(p string) bool { return strings.HasPrefix(w.name, p) }) {
			continue
		}
		set.Rows = append(set.Rows, b.fioWorkload(w, ts)...)
		if key != "fio" {
			continue
		}
		// One more Async run, profiled on both sides (not counted).
		b.syncAll()
		profs, err := b.profileRun(a, bk, func() error {
			_, err := fio(a.url("async"), fioVolSize, w, b.runtime)
			return err
		})
		if err != nil {
			b.logln("  profile of %s: %v", w.name, err)
			continue
		}
		for side, top := range profs {
			b.res.Profiles = append(b.res.Profiles, profile{Workload: w.name, Side: side, Top: top})
		}
		if err := testkit.Wait(2*time.Minute, "async pair caught up after the profile", inSync(a, bk, "async"), testkit.Every(50*time.Millisecond)); err != nil {
			return err
		}
	}
	return nil
}

// preconditionTarget writes every byte of t's volume once (1 MiB
// sequential writes through NBD) and waits until its replicas hold them, so
// that the measured runs overwrite allocated blocks, as on a volume in use.
// On fresh sparse files a run also pays the file system's first allocation
// of the blocks it touches, and not every target pays it in the measured
// interval: a Tandem backup's fdatasync allocates its delayed blocks itself,
// while the mirror's nbdkit leaves them to the kernel's flusher, after the
// run (docs/benchmarks.md, analysis).
func (b *bench) preconditionTarget(t *fioTarget) error {
	t0 := time.Now()
	if _, err := fioRamp(t.uri, fioVolSize, preconditionLoad, 0, 0); err != nil {
		return fmt.Errorf("precondition %s: %w", t.name, err)
	}
	if t.drained != nil {
		if err := testkit.Wait(2*time.Minute, t.name+"'s replicas caught up after the precondition", t.drained, testkit.Every(50*time.Millisecond)); err != nil {
			return err
		}
	}
	b.logln("  %s preconditioned (%d MiB written end to end) in %v", t.name, fioVolSize>>20, time.Since(t0).Round(100*time.Millisecond))
	return nil
}

// preconditionLoad writes a volume once, sequentially.
var preconditionLoad = workload{name: "precondition", rw: "write", bs: "1M", qd: 8}

// fioTargets starts every target of the fio section: nbdkit, a standalone
// member, the Async and Sync pairs (primary agent a, backup agent bk), the
// qemu mirrors, and with -compare the baseline agent's members.
func (b *bench) fioTargets() (ts []*fioTarget, a, bk *agentProc, err error) {
	if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
		return nil, nil, nil, fmt.Errorf("qemu-storage-daemon is missing (make bench installs it: qemu-system-common): %w", err)
	}
	volumes := 10
	if b.baseBin != "" {
		volumes += 5
	}
	if b.fioWantsTLS() {
		volumes += 4
	}
	data, err := b.fioDataDir(volumes, fioVolSize)
	if err != nil {
		return nil, nil, nil, err
	}
	if b.netns {
		if err := b.netnsUp(); err != nil {
			return nil, nil, nil, err
		}
	}
	pc, bc := b.sides()
	a, bk = b.newAgent("node-a"), b.newAgent("node-b")
	byName := map[string]*fioTarget{}
	members, err := b.fioMembers(a, bk, b.agentBin, data, pc, bc, "")
	if err != nil {
		return nil, nil, nil, err
	}
	if b.fioWantsTLS() {
		// A pair of its own: the same places and binary, both agents with
		// --tls-dir, the control API over HTTPS.
		ca, err := newBenchTLS(filepath.Join(b.work, "tls"))
		if err != nil {
			return nil, nil, nil, err
		}
		c, d := b.newAgent("tls-a"), b.newAgent("tls-b")
		c.tls, d.tls = ca, ca
		tm, err := b.fioMembers(c, d, b.agentBin, data, pc, bc, "-tls")
		if err != nil {
			return nil, nil, nil, fmt.Errorf("TLS pair: %w", err)
		}
		members = append(members, tm...)
	}
	for _, t := range members {
		byName[t.name] = t
	}
	nk, err := b.fioNbdkit(filepath.Join(data, "peer", "disk.img"), pc)
	if err != nil {
		return nil, nil, nil, err
	}
	byName[nk.name] = nk
	for _, m := range []struct{ name, mode string }{{"qemu-async", mirrorBackground}, {"qemu-sync", mirrorWriteBlocking}} {
		q, err := b.fioQemu(m.name, filepath.Join(data, m.name), m.mode, pc, bc)
		if err != nil {
			return nil, nil, nil, err
		}
		byName[m.name] = q
	}
	order := targets
	if b.baseBin != "" {
		c, d := b.newAgent("base-a"), b.newAgent("base-b")
		c.bin, d.bin = b.baseBin, b.baseBin
		base, err := b.fioMembers(c, d, b.baseBin, data, pc, bc, "-base")
		if err != nil {
			return nil, nil, nil, err
		}
		for _, t := range base {
			byName[t.name] = t
		}
		order = []string{"nbdkit", "standalone", "standalone-base", "async", "async-base", "async-tls", "qemu-async", "sync", "sync-base", "sync-tls", "qemu-sync"}
	}
	names, err := fioOrder(order, byName, b.targets)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, n := range names {
		ts = append(ts, byName[n])
	}
	return ts, a, bk, nil
}

// fioOrder is the order in which the targets started (started) run in
// each round: order, less those not asked for (-targets; empty: all) and
// the TLS pairs when they were not started (a variant section runs them
// only when named). A target asked for by name that did not start is an
// error.
func fioOrder[T any](order []string, started map[string]T, asked []string) ([]string, error) {
	var out []string
	for _, n := range order {
		if len(asked) > 0 && !slices.Contains(asked, n) {
			continue
		}
		if _, ok := started[n]; !ok {
			if len(asked) == 0 && strings.HasSuffix(n, "-tls") {
				continue
			}
			return nil, fmt.Errorf("fio target %s did not start", n)
		}
		out = append(out, n)
	}
	for _, n := range asked {
		if !slices.Contains(out, n) {
			return nil, fmt.Errorf("-targets: no fio target %s here (%s)", n, strings.Join(order, ", "))
		}
	}
	return out, nil
}

// fioMembers starts agents p and s (data under data, in places pc and sc)
// with a standalone member (solo) and an Async and a Sync pair, and
// returns them as targets named standalone, async, sync plus suffix
// (suffix -tls: the pairs only, standalone-tls would measure nothing TLS
// touches).
func (b *bench) fioMembers(p, s *agentProc, bin, data string, pc, sc place, suffix string) ([]*fioTarget, error) {
	p.bin, s.bin = bin, bin
	p.dir, s.dir = filepath.Join(data, p.node), filepath.Join(data, s.node)
	p.at, s.at = pc, sc
	for _, ag := range []*agentProc{p, s} {
		if err := ag.start(); err != nil {
			return nil, err
		}
	}
	var ts []*fioTarget
	if suffix != "-tls" {
		if err := p.put("solo", fioVolSize, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Mode: agentapi.ModeAsync, Initialize: true}); err != nil {
			return nil, err
		}
		ts = append(ts, &fioTarget{name: "standalone" + suffix, uri: p.url("solo"), pids: func() []int { return []int{p.pid()} },
			files: func() []string { return []string{p.volumeDir("solo")} }})
	}
	for _, m := range []agentapi.Mode{agentapi.ModeAsync, agentapi.ModeSync} {
		v := strings.ToLower(string(m))
		if err := pair(p, s, v, fioVolSize, m, 1); err != nil {
			return nil, err
		}
		if err := testkit.Wait(30*time.Second, v+suffix+" pair in sync", inSync(p, s, v)); err != nil {
			return nil, err
		}
		ts = append(ts, &fioTarget{name: v + suffix, uri: p.url(v), pids: func() []int { return []int{p.pid(), s.pid()} }, drained: inSync(p, s, v),
			files: func() []string { return []string{p.volumeDir(v), s.volumeDir(v)} }})
	}
	return ts, nil
}

// fioNbdkit is the nbdkit target, restarted before a run if it exited.
func (b *bench) fioNbdkit(file string, at place) (*fioTarget, error) {
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return nil, err
	}
	nk, err := b.startNbdkitOn(file, fioVolSize, at)
	if err != nil {
		return nil, err
	}
	t := &fioTarget{name: "nbdkit", uri: nk.url(), pids: func() []int { return []int{nk.cmd.Process.Pid} },
		files: func() []string { return []string{file} }}
	t.prepare = func() error {
		if processAlive(nk.exited) {
			return nil
		}
		b.logln("nbdkit exited; restarting it")
		n, err := b.startNbdkitOn(file, fioVolSize, at)
		if err != nil {
			return err
		}
		nk, t.uri = n, n.url()
		return nil
	}
	return t, nil
}

// fioQemu is a qemu mirror target; one whose job died is started again
// (fresh files) before the next run.
func (b *bench) fioQemu(name, dir, mode string, pc, bc place) (*fioTarget, error) {
	q, err := b.startQemuMirror(dir, fioVolSize, mode, pc, bc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	t := &fioTarget{name: name, uri: q.url(), pids: func() []int { return q.pids() }, files: func() []string { return []string{dir} },
		check: func() error { return q.healthy() }, drained: func() (bool, error) { return q.drained() }}
	t.prepare = func() error {
		err := q.healthy()
		if err == nil {
			return nil
		}
		b.logln("%s: %v; starting it again", name, err)
		q.stop()
		n, err := b.startQemuMirror(dir, fioVolSize, mode, pc, bc)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		q, t.uri = n, n.url()
		if b.precondition {
			return b.preconditionTarget(t)
		}
		return nil
	}
	return t, nil
}

// fioWorkload runs workload w on every target, b.runs rounds in a rotated
// order, and summarizes each target's runs.
func (b *bench) fioWorkload(w workload, ts []*fioTarget) []fioRow {
	type runs struct {
		iops, mibs, p50, p99, ratio, qratio, cpu, durable []float64
		errs                                              []string
	}
	per := map[string]*runs{}
	for _, t := range ts {
		per[t.name] = &runs{}
	}
	for r := 0; r < b.runs; r++ {
		got := map[string]float64{}
		for i := range ts {
			t := ts[(i+r)%len(ts)]
			res, cpu, err := b.fioOnce(t, w)
			if err != nil {
				b.logln("  %s %s round %d: %v", w.name, t.name, r+1, err)
				per[t.name].errs = append(per[t.name].errs, err.Error())
				continue
			}
			got[t.name] = res.IOPS
			p := per[t.name]
			p.iops, p.mibs = append(p.iops, res.IOPS), append(p.mibs, res.MiBs)
			p.p50, p.p99 = append(p.p50, res.P50us), append(p.p99, res.P99us)
			if !math.IsNaN(cpu.own) {
				p.cpu = append(p.cpu, cpu.own)
			}
			if !math.IsNaN(cpu.durable) {
				p.durable = append(p.durable, cpu.durable)
			}
			b.logln("  %-22s %-15s round %d: %8.0f IOPS %8.1f MiB/s p50 %6.0fµs p99 %7.0fµs %6.2f CPU s/GiB, %6.2f until durable", w.name, t.name, r+1, res.IOPS, res.MiBs, res.P50us, res.P99us, cpu.own, cpu.durable)
		}
		for name, v := range got {
			if base := got["nbdkit"]; base > 0 {
				per[name].ratio = append(per[name].ratio, v/base)
			}
			if peer := got[qemuPeer(name)]; peer > 0 {
				per[name].qratio = append(per[name].qratio, v/peer)
			}
		}
	}
	var rows []fioRow
	for _, t := range ts {
		p := per[t.name]
		rows = append(rows, fioRow{Workload: w.name, Target: t.name, IOPS: summarize(p.iops), MiBs: summarize(p.mibs),
			P50: summarize(p.p50), P99: summarize(p.p99), Ratio: summarize(p.ratio), QemuRatio: summarize(p.qratio),
			CPU: summarize(p.cpu), CPUDurable: summarize(p.durable), Errors: p.errs})
	}
	return rows
}

// cpuUse is what a run cost in CPU seconds per GiB written (read, for a
// read-only workload; NaN if nothing moved or not measured).
type cpuUse struct {
	// own: utime+stime of the target's processes.
	own float64
	// durable: own, plus the kernel's writeback threads (kworker, jbd2)
	// over the same interval, plus an fdatasync of every replica file once
	// the replicas caught up. A target that syncs (a Tandem backup) does
	// its writeback on its own account; one that leaves its dirty pages to
	// the kernel (nbdkit) does not, and would look cheaper than it is.
	durable float64
}

// fioOnce runs w once on t, from a state where every replica holds every
// write to the same again, and returns fio's figures and the CPU it cost.
// The run has no ramp: fio's bytes and the CPU time cover the same
// interval, which for a replicated target ends when the backup has caught
// up (the copy an async mirror owes is part of the cost of the writes).
func (b *bench) fioOnce(t *fioTarget, w workload) (fioResult, cpuUse, error) {
	none := cpuUse{math.NaN(), math.NaN()}
	if t.prepare != nil {
		if err := t.prepare(); err != nil {
			return fioResult{}, none, err
		}
	}
	b.syncAll()
	pids := t.pids()
	cpu0, err := cpuSeconds(pids)
	if err != nil {
		return fioResult{}, none, err
	}
	wb0, err := readWritebackThreads()
	if err != nil {
		return fioResult{}, none, err
	}
	res, err := fioRamp(t.uri, fioVolSize, w, b.runtime, 0)
	if err != nil {
		return res, none, err
	}
	if t.check != nil {
		if err := t.check(); err != nil {
			return res, none, fmt.Errorf("after the run: %w", err)
		}
	}
	if t.drained != nil {
		if err := testkit.Wait(2*time.Minute, t.name+"'s backup caught up", t.drained, testkit.Every(50*time.Millisecond)); err != nil {
			return res, none, err
		}
	}
	cpu1, err := cpuSeconds(pids)
	if err != nil {
		return res, none, err
	}
	moved := res.WriteBytes
	if w.isRead {
		moved = res.ReadBytes
	}
	if moved <= 0 {
		return res, none, nil
	}
	gib := float64(moved) / (1 << 30)
	use := cpuUse{own: (cpu1 - cpu0) / gib, durable: math.NaN()}
	if t.files != nil {
		synced, err := syncFiles(t.files())
		if err != nil {
			return res, none, err
		}
		wb1, err := readWritebackThreads()
		if err != nil {
			return res, none, err
		}
		use.durable = (cpu1 - cpu0 + synced + writebackSecondsSince(wb0, wb1)) / gib
	}
	return res, use, nil
}

func processAlive(exited chan struct{}) bool {
	select {
	case <-exited:
		return false
	default:
		return true
	}
}

// profileRun takes a CPU profile of the primary and the backup agent while
// run runs, and returns `go tool pprof -top` of each.
func (b *bench) profileRun(p, s *agentProc, run func() error) (map[string]string, error) {
	secs := int(b.runtime.Seconds())
	if secs < 1 {
		secs = 1
	}
	out := map[string]string{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var perr error
	for side, ag := range map[string]*agentProc{"primary": p, "backup": s} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Second) // fio's ramp
			file := filepath.Join(b.work, fmt.Sprintf("cpu-%s-%d.prof", side, time.Now().UnixNano()))
			err := fetch(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", ag.pprof, secs), file)
			var top string
			if err == nil {
				var o []byte
				o, err = exec.Command("go", "tool", "pprof", "-top", "-nodecount=14", b.agentBin, file).Output()
				top = trimPprof(string(o))
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				perr = err
				return
			}
			out[side] = top
		}()
	}
	err := run()
	wg.Wait()
	if err != nil {
		return nil, err
	}
	return out, perr
}

func fetch(url, file string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// trimPprof keeps the summary line and the table of `pprof -top`.
func trimPprof(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "File:") || strings.HasPrefix(l, "Build ID:") || strings.HasPrefix(l, "Type:") ||
			strings.HasPrefix(l, "Time:") || strings.HasPrefix(l, "Showing") || strings.HasPrefix(l, "Dropped") {
			continue
		}
		if strings.TrimSpace(l) == "" {
			continue
		}
		keep = append(keep, strings.ReplaceAll(l, "github.com/tandem-storage/tandem/", ""))
	}
	return strings.Join(keep, "\n")
}
