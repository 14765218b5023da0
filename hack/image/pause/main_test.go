package main

import (
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildPause builds this program the way make image does.
func buildPause(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "pause")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func TestStatic(t *testing.T) {
	f, err := elf.Open(buildPause(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("the binary has a %v program header: not static", p.Type)
		}
	}
}

func TestExitsZeroOnSignal(t *testing.T) {
	bin := buildPause(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := exec.Command(bin)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// It must still run after a while: it waits.
		time.Sleep(300 * time.Millisecond)
		if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
			t.Fatalf("pause exited on its own: %v", err)
		}
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%v: %v, want exit 0", sig, err)
			}
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("%v: still running after 5 s", sig)
		}
	}
}

// TestReapsAsPID1 runs pause as PID 1 of a new PID namespace, orphans a
// process in it (which makes pause its parent) and checks that pause reaps
// it when it exits. Needs root (CLONE_NEWPID) and nsenter.
func TestReapsAsPID1(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a PID namespace")
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		t.Skip("needs nsenter")
	}
	bin := buildPause(t)
	pause := exec.Command(bin)
	pause.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := pause.Start(); err != nil {
		if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EINVAL) {
			t.Skipf("no PID namespace here: %v", err)
		}
		t.Fatal(err)
	}
	defer func() {
		pause.Process.Signal(syscall.SIGTERM)
		pause.Wait()
	}()
	time.Sleep(100 * time.Millisecond)

	// sh runs in pause's namespace and leaves a sleep behind: the orphan
	// becomes pause's child.
	orphan := exec.Command(nsenter, "--target", strconv.Itoa(pause.Process.Pid), "--pid", "--",
		"sh", "-c", "sleep 2 </dev/null >/dev/null 2>&1 & exit 0")
	if out, err := orphan.CombinedOutput(); err != nil {
		t.Fatalf("nsenter: %v\n%s", err, out)
	}
	if kids := children(t, pause.Process.Pid); len(kids) != 1 || kids[0] == "Z" {
		t.Fatalf("pause's children %v, want the running orphan", kids)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		kids := children(t, pause.Process.Pid)
		if len(kids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pause's children after 5 s: %v (Z: not reaped)", kids)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// And it still exits 0 on SIGTERM as PID 1.
	if err := pause.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := pause.Wait(); err != nil {
		t.Errorf("pause as PID 1: %v, want exit 0", err)
	}
}

// children returns the states (R, S, Z, ...) of ppid's child processes.
func children(t *testing.T, ppid int) []string {
	t.Helper()
	dirs, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var states []string
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil {
			continue // gone
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) >= 2 && f[1] == strconv.Itoa(ppid) {
			states = append(states, f[0])
		}
	}
	return states
}
