package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"
)

// workload is one fio job shape.
type workload struct {
	name   string // table label
	rw     string // fio --rw
	bs     string
	qd     int
	mixed  bool // randrw 70/30
	isRead bool
}

// fioResult is what one fio run measured.
type fioResult struct {
	IOPS  float64 // read + write
	MiBs  float64
	P50us float64 // write latency (read latency for read-only jobs)
	P99us float64
	MaxUs float64
	// WriteBytes and ReadBytes are what the measured time moved (fio's
	// io_bytes: the ramp excluded).
	WriteBytes, ReadBytes int64
	Errors                int
	Elapsed               time.Duration
}

type fioSide struct {
	IOBytes int64   `json:"io_bytes"`
	IOPS    float64 `json:"iops"`
	BwBytes float64 `json:"bw_bytes"`
	ClatNs  struct {
		Max        float64            `json:"max"`
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

type fioJSON struct {
	Jobs []struct {
		Error int     `json:"error"`
		Read  fioSide `json:"read"`
		Write fioSide `json:"write"`
	} `json:"jobs"`
}

// fio runs one job against an NBD URI and parses its JSON output. A timed
// run (runtime > 0) is measured after a 1 s ramp. args are extra fio
// options.
func fio(uri string, size int64, w workload, runtime time.Duration, args ...string) (fioResult, error) {
	return fioRamp(uri, size, w, runtime, time.Second, args...)
}

// fioRamp is fio with the given ramp before a timed run's measured time
// (none if 0).
func fioRamp(uri string, size int64, w workload, runtime, ramp time.Duration, args ...string) (fioResult, error) {
	a := []string{"--name=bench", "--ioengine=nbd", "--uri=" + uri, "--rw=" + w.rw, "--bs=" + w.bs,
		"--iodepth=" + strconv.Itoa(w.qd), "--size=" + strconv.FormatInt(size, 10),
		"--output-format=json", "--randrepeat=0"}
	if runtime > 0 {
		a = append(a, "--time_based", fmt.Sprintf("--runtime=%dms", runtime.Milliseconds()))
		if ramp > 0 {
			a = append(a, fmt.Sprintf("--ramp_time=%dms", ramp.Milliseconds()))
		}
	}
	if w.mixed {
		a = append(a, "--rwmixread=70")
	}
	a = append(a, args...)
	return runFio(exec.Command("fio", a...))
}

func runFio(cmd *exec.Cmd) (fioResult, error) {
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	el := time.Since(start)
	if err != nil && out.Len() == 0 {
		return fioResult{}, fmt.Errorf("fio: %v: %s", err, strings.TrimSpace(errb.String()))
	}
	r, perr := parseFio(out.Bytes())
	r.Elapsed = el
	if perr != nil {
		return r, fmt.Errorf("fio: %v (exit: %v; stderr: %s)", perr, err, strings.TrimSpace(errb.String()))
	}
	if r.Errors != 0 {
		return r, fmt.Errorf("fio reported error %d: %s", r.Errors, strings.TrimSpace(errb.String()))
	}
	return r, nil
}

func parseFio(data []byte) (fioResult, error) {
	// fio may print notes before the JSON document.
	if i := bytes.IndexByte(data, '{'); i > 0 {
		data = data[i:]
	}
	var j fioJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return fioResult{}, fmt.Errorf("parse fio JSON: %w", err)
	}
	if len(j.Jobs) == 0 {
		return fioResult{}, fmt.Errorf("fio JSON has no jobs")
	}
	jb := j.Jobs[0]
	r := fioResult{IOPS: jb.Read.IOPS + jb.Write.IOPS, MiBs: (jb.Read.BwBytes + jb.Write.BwBytes) / (1 << 20), Errors: jb.Error,
		WriteBytes: jb.Write.IOBytes, ReadBytes: jb.Read.IOBytes}
	lat := jb.Write
	if jb.Write.IOPS == 0 {
		lat = jb.Read
	}
	r.P50us = lat.ClatNs.Percentile["50.000000"] / 1e3
	r.P99us = lat.ClatNs.Percentile["99.000000"] / 1e3
	r.MaxUs = math.Max(jb.Read.ClatNs.Max, jb.Write.ClatNs.Max) / 1e3
	return r, nil
}

// stat is the median with min and max of a set of runs.
type stat struct {
	N             int
	Med, Min, Max float64
}

func summarize(xs []float64) stat {
	if len(xs) == 0 {
		return stat{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{N: len(s), Med: med, Min: s[0], Max: s[len(s)-1]}
}

// f formats the median with min–max in the given precision.
func (s stat) f(prec int) string {
	if s.N == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%s (%s–%s)", ff(s.Med, prec), ff(s.Min, prec), ff(s.Max, prec))
}

func ff(v float64, prec int) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	if prec == 0 && math.Abs(v) >= 10000 {
		return fmt.Sprintf("%.0fk", v/1000)
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}
