package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
)

// Where the fio section runs: the replicas' storage (-tmpfs), the CPUs
// of the two sides (-pin) and their network (-netns, netns.go). Each
// combination keeps its own results.
const (
	storageDisk  = "disk"
	storageTmpfs = "tmpfs"
	pinningNone  = ""
	pinningSides = "primary side on CPU 0, backup side on CPU 1"
	cpuPrimary   = "0"
	cpuBackup    = "1"
)

// fioKey names the fio section this run fills: fio (on disk, on
// loopback, unpinned), or fio with -tmpfs, -netns, -pinned appended in
// that order (fio-tmpfs, fio-netns, fio-tmpfs-netns-pinned, ...).
func (b *bench) fioKey() string {
	return fioKeyOf(b.tmpfs, b.netns, b.pin)
}

func fioKeyOf(tmpfs, netns, pin bool) string {
	k := "fio"
	if tmpfs {
		k += "-" + storageTmpfs
	}
	if netns {
		k += "-netns"
	}
	if pin {
		k += "-pinned"
	}
	return k
}

// fioDataDir is where the fio targets keep their data: the work directory,
// or a tmpfs mounted under it (-tmpfs) large enough for volumes volumes of
// size bytes each.
func (b *bench) fioDataDir(volumes int, size int64) (string, error) {
	if !b.tmpfs {
		return b.work, nil
	}
	dir := filepath.Join(b.work, "tmpfs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	// A cap, not an allocation: each volume, plus room for the agents'
	// metadata.
	opts := fmt.Sprintf("size=%dm,mode=0700", (int64(volumes)*size+(1<<30))>>20)
	if err := syscall.Mount("tandem-bench", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, opts); err != nil {
		return "", fmt.Errorf("-tmpfs: mount a tmpfs on %s (needs root): %w", dir, err)
	}
	b.mu.Lock()
	b.mounts = append(b.mounts, dir)
	b.mu.Unlock()
	b.logln("data on a tmpfs at %s (%s)", dir, opts)
	return dir, nil
}

// unmount unmounts dir once the processes that used it are gone (the
// kernel may still hold their files for a moment); if it stays busy, it is
// detached (lazy unmount: freed once the last file is closed).
func unmount(dir string) error {
	err := testkit.Wait(5*time.Second, "unmount "+dir, func() (bool, error) {
		err := syscall.Unmount(dir, 0)
		return err == nil || errors.Is(err, syscall.EINVAL), err // EINVAL: not mounted (any more)
	})
	if err == nil {
		return nil
	}
	if derr := syscall.Unmount(dir, syscall.MNT_DETACH); derr != nil {
		return fmt.Errorf("unmount %s: %w (detach: %v)", dir, err, derr)
	}
	return nil
}

// clkTck is the unit of utime and stime in /proc/PID/stat.
var clkTck = func() float64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err != nil {
		return 100
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
	if err != nil || v <= 0 {
		return 100
	}
	return v
}()

// cpuSeconds is the CPU time (utime+stime, every thread) the processes
// pids have used so far.
func cpuSeconds(pids []int) (float64, error) {
	var ticks int64
	for _, pid := range pids {
		t, err := procTicks(pid)
		if err != nil {
			return 0, err
		}
		ticks += t
	}
	return float64(ticks) / clkTck, nil
}

// procTicks is utime+stime of one process from /proc/PID/stat.
func procTicks(pid int) (int64, error) {
	st, err := readStat(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of %d: %w", pid, err)
	}
	return st.ticks, nil
}

// procStat is what the bench reads of a /proc/.../stat file.
type procStat struct {
	comm  string
	ppid  int
	ticks int64 // utime+stime
	start int64 // starttime (field 22): tells a reused PID from the thread that had it
}

// readStat parses a /proc/PID/stat (or /proc/thread-self/stat): the
// command name in parentheses (it may hold spaces), the 4th field (ppid)
// and the 14th and 15th (utime, stime).
func readStat(path string) (procStat, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return procStat{}, err
	}
	return parseStat(string(data))
}

func parseStat(s string) (procStat, error) {
	i, j := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if i < 0 || j < i {
		return procStat{}, fmt.Errorf("stat: no command name")
	}
	f := strings.Fields(s[j+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("stat: %d fields", len(f)+2)
	}
	ppid, err0 := strconv.Atoi(f[1])
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err0, err1, err2); err != nil {
		return procStat{}, fmt.Errorf("stat: %w", err)
	}
	st := procStat{comm: s[i+1 : j], ppid: ppid, ticks: utime + stime}
	if len(f) >= 20 {
		if st.start, err0 = strconv.ParseInt(f[19], 10, 64); err0 != nil {
			return procStat{}, fmt.Errorf("stat: %w", err0)
		}
	}
	return st, nil
}

// kthreaddPid is the parent of every kernel thread.
const kthreaddPid = 2

// writebackThreads is a snapshot of the kernel's worker threads (kworker*,
// where the page cache's writeback runs when no process syncs, and jbd2*,
// ext4's journal): the work a target that leaves its dirty pages to the
// kernel does not pay on its own account. By PID.
type writebackThreads map[int]procStat

func readWritebackThreads() (writebackThreads, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	out := writebackThreads{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil || st.ppid != kthreaddPid {
			continue // gone meanwhile, or not a kernel thread
		}
		if strings.HasPrefix(st.comm, "kworker") || strings.HasPrefix(st.comm, "jbd2") {
			out[pid] = st
		}
	}
	return out, nil
}

// writebackSecondsSince is the CPU time the worker threads of now used
// since the snapshot before: a thread in both (same PID and start time)
// counts its difference, a thread started since counts in full. A thread
// that exited meanwhile is not counted (its last ticks are gone with it);
// before, the sum over the threads of each snapshot was subtracted, and a
// kworker that exited during a run made the figure negative.
func writebackSecondsSince(before, now writebackThreads) float64 {
	var ticks int64
	for pid, st := range now {
		if b, ok := before[pid]; ok && b.start == st.start && b.ticks <= st.ticks {
			ticks += st.ticks - b.ticks
		} else {
			ticks += st.ticks
		}
	}
	return float64(ticks) / clkTck
}

// syncFiles fdatasyncs every regular file under paths (files or
// directories) and returns the CPU time that took on the calling thread:
// the writeback of whatever the files still had dirty.
func syncFiles(paths []string) (float64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before, err := readStat("/proc/thread-self/stat")
	if err != nil {
		return 0, err
	}
	for _, root := range paths {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			if err := syscall.Fdatasync(int(f.Fd())); err != nil {
				return fmt.Errorf("fdatasync %s: %w", path, err)
			}
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	after, err := readStat("/proc/thread-self/stat")
	if err != nil {
		return 0, err
	}
	return float64(after.ticks-before.ticks) / clkTck, nil
}

// fioVariant is one extra fio section of a run (-variants): the main
// section's targets and workloads with the data on a tmpfs, the two sides
// in network namespaces, or pinned to a CPU each.
type fioVariant struct{ tmpfs, netns, pin bool }

func (v fioVariant) String() string {
	var parts []string
	if v.tmpfs {
		parts = append(parts, "tmpfs")
	}
	if v.netns {
		parts = append(parts, "netns")
	}
	if v.pin {
		parts = append(parts, "pin")
	}
	return strings.Join(parts, "+")
}

// variantDefaults is what -variants default means for this run: root (the
// tmpfs variant mounts), variant (-tmpfs, -netns or -pin: the run is a
// variant itself), partial (-compare, -workloads or -targets: a quick or
// before/after run).
type variantDefaults struct{ root, variant, partial bool }

// parseVariants reads -variants: a comma-separated list of tmpfs, netns
// and pin, or several of them joined by +; "none" (or empty) for none;
// "default" for tmpfs when the run is root and runs the whole main fio
// section, none otherwise.
func parseVariants(s string, d variantDefaults) ([]fioVariant, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "", "none":
		return nil, nil
	case "default":
		if d.root && !d.variant && !d.partial {
			return []fioVariant{{tmpfs: true}}, nil
		}
		return nil, nil
	}
	var out []fioVariant
	for _, item := range strings.Split(s, ",") {
		var v fioVariant
		for _, part := range strings.Split(strings.TrimSpace(item), "+") {
			switch strings.TrimSpace(part) {
			case "tmpfs":
				v.tmpfs = true
			case "netns":
				v.netns = true
			case "pin":
				v.pin = true
			default:
				return nil, fmt.Errorf("-variants %q: %q is not a variant (tmpfs, netns, pin, joined by + to combine; none; default)", s, part)
			}
		}
		if slices.Contains(out, v) {
			return nil, fmt.Errorf("-variants %q: %s twice", s, v)
		}
		out = append(out, v)
	}
	return out, nil
}
