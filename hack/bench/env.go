package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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

// procTicks is utime+stime of one process from /proc/PID/stat (the 14th
// and 15th fields; the command name in parentheses may hold spaces).
func procTicks(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of %d: %w", pid, err)
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return utime + stime, nil
}
