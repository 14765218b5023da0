// Command recorder is the workload of the CSI story (make demo, test/e2e):
// it appends numbered records to a file on a Tandem volume, makes each one
// durable (fdatasync) before it reports it, and on start checks every
// record already there. Its log is the evidence: "RECORDER ack N" means
// record N was durable when the line was printed; "RECORDER verified N"
// (first line) means records 0..N-1 were found intact after a restart, on
// whichever node the Pod runs now.
//
// Record format (4096 bytes, at offset seq×4096 of <dir>/records):
// "TNDMREC1", seq (uint64 LE), Unix nanoseconds (int64 LE), CRC-32C (uint32
// LE) of the record with these four bytes zeroed, then bytes derived from
// seq.
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

const (
	recSize = 4096
	magic   = "TNDMREC1"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func record(seq uint64, now time.Time) []byte {
	b := make([]byte, recSize)
	copy(b, magic)
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint64(b[16:], uint64(now.UnixNano()))
	for i := 28; i < recSize; i++ {
		b[i] = byte(seq*31 + uint64(i))
	}
	binary.LittleEndian.PutUint32(b[24:], crc32.Checksum(b, castagnoli))
	return b
}

// check says whether b is record seq: "" if so, else what is wrong.
func check(b []byte, seq uint64) string {
	if !bytes.Equal(b[:8], []byte(magic)) {
		return "no record"
	}
	if got := binary.LittleEndian.Uint64(b[8:]); got != seq {
		return fmt.Sprintf("record %d in the place of %d", got, seq)
	}
	sum := binary.LittleEndian.Uint32(b[24:])
	c := append([]byte(nil), b...)
	binary.LittleEndian.PutUint32(c[24:], 0)
	if crc32.Checksum(c, castagnoli) != sum {
		return "checksum mismatch"
	}
	return ""
}

func main() {
	dir := flag.String("dir", "/data", "Directory on the volume.")
	interval := flag.Duration("interval", 50*time.Millisecond, "Pause between records.")
	limit := flag.Uint64("max", 100000, "Stop appending after this many records (the volume must hold them: 4 KiB each).")
	flag.Parse()
	if err := run(*dir, *interval, *limit); err != nil {
		fmt.Fprintf(os.Stderr, "RECORDER error: %v\n", err)
		os.Exit(1)
	}
}

func run(dir string, interval time.Duration, limit uint64) error {
	f, err := os.OpenFile(filepath.Join(dir, "records"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	// Check what is there: records 0, 1, ... until the first place without
	// one. A record that is there but damaged is a failure unless it is
	// the last one (a write cut short before it was acknowledged).
	var n uint64
	buf := make([]byte, recSize)
	for ; ; n++ {
		if _, err := f.ReadAt(buf, int64(n)*recSize); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return fmt.Errorf("reading record %d: %w", n, err)
		}
		if why := check(buf, n); why != "" {
			if why == "no record" && bytes.Count(buf, []byte{0}) == recSize {
				break
			}
			next := make([]byte, recSize)
			if _, err := f.ReadAt(next, int64(n+1)*recSize); err == nil && check(next, n+1) == "" {
				return fmt.Errorf("record %d damaged (%s) while record %d is intact", n, why, n+1)
			}
			fmt.Printf("RECORDER torn %d (%s): never acknowledged, written again\n", n, why)
			break
		}
	}
	fmt.Printf("RECORDER verified %d\n", n)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	for seq := n; seq < limit; seq++ {
		if _, err := f.WriteAt(record(seq, time.Now()), int64(seq)*recSize); err != nil {
			return fmt.Errorf("writing record %d: %w", seq, err)
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			return fmt.Errorf("fdatasync after record %d: %w", seq, err)
		}
		fmt.Printf("RECORDER ack %d\n", seq)
		select {
		case <-stop:
			fmt.Println("RECORDER stopped")
			return nil
		case <-time.After(interval):
		}
	}
	fmt.Println("RECORDER done")
	<-stop
	return nil
}
