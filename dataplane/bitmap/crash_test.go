package bitmap

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/go-logr/logr"
)

const (
	crashDirEnv    = "TANDEM_BITMAP_CRASH_DIR"
	crashSeedEnv   = "TANDEM_BITMAP_CRASH_SEED"
	crashFaultsEnv = "TANDEM_BITMAP_CRASH_FAULTS"
)

// TestJournalCrashChild is the process TestJournalCrash kills. It behaves like
// the volume engine: recovered regions go into its Tracker; writers set the
// Tracker bits, Mark the journal and then print "M <off>" (the write would now
// be acknowledged); a checkpointer snapshots the Tracker and checkpoints; now
// and then the peer "catches up" (Tracker.Clear), printed as "C". It runs
// until SIGKILLed.
func TestJournalCrashChild(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		t.Skip("helper process for TestJournalCrash")
	}
	seed, _ := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	var outMu sync.Mutex
	say := func(format string, args ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintf(os.Stdout, format+"\n", args...) // one write(2) per line
	}
	j, rec, err := OpenJournal(dir, tSize, tRegion, tExtent, logr.Discard())
	if err != nil {
		say("ERR %v", err)
		os.Exit(3)
	}
	// Half the rounds carry hot extents across checkpoints (the volume
	// engine's setting), half do not.
	j.KeepHot(seed%2 == 1)
	faults := os.Getenv(crashFaultsEnv) != ""
	if faults {
		// Retry every few milliseconds so that a round sees many
		// failures and recoveries.
		j.mu.Lock()
		j.minRetry, j.retryDelay = 2*time.Millisecond, 2*time.Millisecond
		j.mu.Unlock()
		d := newDiskFull(syscall.ENOSPC, allOps...)
		j.SetFaultHook(d.hook)
		go func() {
			rng := rand.New(rand.NewPCG(seed, 2))
			for {
				full := rng.IntN(3) == 0
				d.on.Store(full)
				if full {
					time.Sleep(time.Duration(rng.IntN(5000)) * time.Microsecond)
				} else {
					time.Sleep(time.Duration(rng.IntN(30000)) * time.Microsecond)
				}
				say("S %d", j.Stats().Reopens)
			}
		}()
	}
	g := *j.geo()
	tr := NewTracker(tSize, tRegion)
	tr.MarkRegions(rec)
	var mu sync.RWMutex // writers hold it shared from Tracker bit to printed ack
	go func() {
		rng := rand.New(rand.NewPCG(seed, 1))
		for {
			mu.Lock()
			snap := tr.Dirty()
			mu.Unlock()
			if err := j.Checkpoint(snap); err != nil && !faults {
				say("ERR checkpoint: %v", err)
				os.Exit(3)
			}
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
		}
	}()
	for w := 0; w < 4; w++ {
		go func(w int) {
			rng := rand.New(rand.NewPCG(seed, uint64(w)+10))
			for i := 0; ; i++ {
				off := rng.Int64N(tSize)
				n := min(rng.Int64N(256*KiB)+1, tSize-off)
				mu.RLock()
				tr.MarkRegions(extentRegionsOf(&g, off, n)) // stands in for Mark(off, n, seq) with no ack
				if err := j.Mark(context.Background(), off, n); err != nil {
					if !faults {
						say("ERR mark: %v", err)
						os.Exit(3)
					}
					say("F") // not acknowledged
					mu.RUnlock()
					continue
				}
				say("M %d %d", off, n)
				mu.RUnlock()
				if rng.IntN(200) == 0 {
					mu.Lock()
					tr.Clear()
					say("C")
					mu.Unlock()
				}
			}
		}(w)
	}
	say("READY")
	select {}
}

// TestJournalCrash SIGKILLs a marking, checkpointing child at random moments
// and checks that every write it reported as marked (since the last time the
// peer caught up) is in the recovered bitmap. Later rounds recover what
// earlier rounds left.
func TestJournalCrash(t *testing.T) {
	if testing.Short() && os.Getenv("CI") == "" {
		t.Skip("spawns processes")
	}
	crashRounds(t, false)
}

// TestJournalCrashTransientFaults is TestJournalCrash with a disk that keeps
// filling up and emptying: the child's journal fails and reopens its log
// many times, and the crash lands before, during or after a recovery. Every
// Mark that returned nil must still be recovered, and no round may find the
// journal corrupt (a torn failed append followed by data, a missing log).
func TestJournalCrashTransientFaults(t *testing.T) {
	if testing.Short() && os.Getenv("CI") == "" {
		t.Skip("spawns processes")
	}
	crashRounds(t, true)
}

func crashRounds(t *testing.T, faults bool) {
	g := mustGeo(t)
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	expected := roaring.New() // regions that must be recovered
	const rounds = 6
	totalMarks, totalFailed, totalReopens := 0, 0, 0
	for round := 0; round < rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestJournalCrashChild$", "-test.count=1")
		// Odd seeds (every other round) run the child with KeepHot.
		seed := rng.IntN(1<<29)*2 + round%2
		cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, crashSeedEnv+"="+strconv.Itoa(seed))
		if faults {
			cmd.Env = append(cmd.Env, crashFaultsEnv+"=1")
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1024)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() { // only complete lines: a line cut by the kill is dropped
				lines <- sc.Text()
			}
		}()

		killAt := time.Duration(20+rng.IntN(300)) * time.Millisecond
		var timer <-chan time.Time
		ready := time.After(20 * time.Second)
		marks, failed, reopens := 0, 0, 0
	read:
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					break read
				}
				switch {
				case l == "READY":
					timer = time.After(killAt)
					ready = nil
				case l == "C":
					expected.Clear()
				case l == "F":
					failed++
				case strings.HasPrefix(l, "S "):
					fmt.Sscanf(l, "S %d", &reopens)
				case strings.HasPrefix(l, "M "):
					var off, n int64
					if _, err := fmt.Sscanf(l, "M %d %d", &off, &n); err != nil {
						t.Fatalf("bad child line %q", l)
					}
					expected.Or(extentRegionsOf(g, off, n))
					marks++
				case strings.HasPrefix(l, "ERR"):
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("round %d: child: %s", round, l)
				}
			case <-timer:
				if err := cmd.Process.Kill(); err != nil {
					t.Fatal(err)
				}
				timer = nil
			case <-ready:
				cmd.Process.Kill()
				t.Fatal("child never became ready")
			}
		}
		cmd.Wait()
		totalMarks += marks

		j, rec, err := OpenJournal(dir, tSize, tRegion, tExtent, logr.Discard())
		if err != nil {
			t.Fatalf("round %d: reopening after SIGKILL: %v", round, err)
		}
		if missing := roaring.AndNot(expected, rec); !missing.IsEmpty() {
			t.Fatalf("round %d: %d acknowledged regions missing after crash (first %v); recovered %d",
				round, missing.GetCardinality(), head(missing), rec.GetCardinality())
		}
		t.Logf("round %d: killed after %v, %d marks (%d failed, %d reopens of the log), must recover %d regions, recovered %d",
			round, killAt, marks, failed, reopens, expected.GetCardinality(), rec.GetCardinality())
		totalFailed += failed
		totalReopens += reopens
		if err := j.Close(nil); err != nil {
			t.Fatal(err)
		}
	}
	if totalMarks == 0 {
		t.Fatal("children never marked anything")
	}
	if faults && (totalFailed == 0 || totalReopens == 0) {
		t.Fatalf("%d Marks failed and the log was reopened %d times: the fault injection did not work", totalFailed, totalReopens)
	}
}
