package main

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// humanBytes renders a byte count in binary units: "0 B", "512 B",
// "64 KiB", "1.5 GiB". Whole multiples drop the decimal.
func humanBytes(n int64) string {
	if n < 0 {
		if n == math.MinInt64 {
			return "-8 EiB"
		}
		return "-" + humanBytes(-n)
	}
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatInt(n, 10) + " B"
	}
	for i := 0; i < len(units); i++ {
		unit := int64(1) << (10 * (i + 1))
		if n%unit == 0 && (n/unit < 1024 || i == len(units)-1) {
			return fmt.Sprintf("%d %ciB", n/unit, units[i])
		}
		v := math.Round(float64(n)/float64(unit)*10) / 10
		if v < 1024 || i == len(units)-1 {
			return fmt.Sprintf("%.1f %ciB", v, units[i])
		}
	}
	panic("unreachable")
}

// humanRate renders bytes per second.
func humanRate(bps int64) string { return humanBytes(bps) + "/s" }

// humanDuration renders a duration compactly with at most two units:
// "0s", "45s", "3m12s", "2h5m", "3d4h". Negative durations (clock skew)
// render as "0s".
func humanDuration(d time.Duration) string {
	if d < time.Second {
		return "0s"
	}
	s := int64(d / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return twoUnits(s/60, "m", s%60, "s")
	case s < 86400:
		return twoUnits(s/3600, "h", s%3600/60, "m")
	default:
		return twoUnits(s/86400, "d", s%86400/3600, "h")
	}
}

func twoUnits(a int64, ua string, b int64, ub string) string {
	if b == 0 {
		return fmt.Sprintf("%d%s", a, ua)
	}
	return fmt.Sprintf("%d%s%d%s", a, ua, b, ub)
}

// ago renders how long before now t was: "5m ago", or "never" for nil.
func ago(t *metav1.Time, now time.Time) string {
	if t == nil || t.IsZero() {
		return "never"
	}
	return humanDuration(now.Sub(t.Time)) + " ago"
}

// timestamp renders t as RFC 3339 with its age: "2026-01-02T03:04:05Z (5m ago)".
func timestamp(t *metav1.Time, now time.Time) string {
	if t == nil || t.IsZero() {
		return "never"
	}
	return t.UTC().Format(time.RFC3339) + " (" + ago(t, now) + ")"
}

// copyETA is the time a copy still needs: the controller's estimate when it
// gave one, else what is left at the current rate. ok is false when neither
// is known (no rate yet).
func copyETA(c *storagev1alpha1.CopyProgress) (eta time.Duration, ok bool) {
	left := c.TotalBytes - c.DoneBytes
	switch {
	case c.TotalBytes > 0 && left <= 0:
		return 0, true
	case c.ETASeconds > 0:
		return time.Duration(c.ETASeconds) * time.Second, true
	case c.BytesPerSecond > 0 && left > 0:
		secs := (left + c.BytesPerSecond - 1) / c.BytesPerSecond
		return time.Duration(secs) * time.Second, true
	}
	return 0, false
}

// copyLine renders a running copy: target, done/total, percentage, rate, ETA.
func copyLine(c *storagev1alpha1.CopyProgress, now time.Time) string {
	var b strings.Builder
	if c.Target != "" {
		fmt.Fprintf(&b, "to %s: ", c.Target)
	}
	if c.TotalBytes > 0 {
		pct := float64(c.DoneBytes) * 100 / float64(c.TotalBytes)
		fmt.Fprintf(&b, "%s of %s (%.1f%%)", humanBytes(c.DoneBytes), humanBytes(c.TotalBytes), math.Min(pct, 100))
	} else {
		fmt.Fprintf(&b, "%s copied, total not known yet", humanBytes(c.DoneBytes))
	}
	if c.BytesPerSecond > 0 {
		fmt.Fprintf(&b, ", %s", humanRate(c.BytesPerSecond))
	} else {
		b.WriteString(", rate not known yet")
	}
	if eta, ok := copyETA(c); ok {
		fmt.Fprintf(&b, ", ETA %s", humanDuration(eta))
	}
	if c.StartTime != nil && !c.StartTime.IsZero() {
		fmt.Fprintf(&b, ", started %s", ago(c.StartTime, now))
	}
	if c.FullCopy {
		why := c.Reason
		if why == "" {
			why = "the bitmaps were lost"
		}
		fmt.Fprintf(&b, ", FULL COPY (%s)", why)
	}
	return b.String()
}

// regionRun is an inclusive run of regions and the bytes it covers.
type regionRun struct {
	FirstRegion uint32 `json:"firstRegion"`
	LastRegion  uint32 `json:"lastRegion"`
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
}

// mergeRuns turns region numbers (any order, duplicates allowed) into
// inclusive runs of consecutive regions with their byte ranges.
func mergeRuns(regions []uint32, regionSize int64) []regionRun {
	rs := slices.Clone(regions)
	slices.Sort(rs)
	rs = slices.Compact(rs)
	var out []regionRun
	for _, r := range rs {
		if n := len(out); n > 0 && uint64(out[n-1].LastRegion)+1 == uint64(r) {
			out[n-1].LastRegion = r
			out[n-1].Length += regionSize
			continue
		}
		out = append(out, regionRun{FirstRegion: r, LastRegion: r, Offset: int64(r) * regionSize, Length: regionSize})
	}
	return out
}

// String renders a run as "regions 5-7, bytes 327680-524287 (192 KiB)".
func (r regionRun) String() string {
	regions := fmt.Sprintf("region %d", r.FirstRegion)
	if r.LastRegion != r.FirstRegion {
		regions = fmt.Sprintf("regions %d-%d", r.FirstRegion, r.LastRegion)
	}
	return fmt.Sprintf("%s, bytes %d-%d (%s)", regions, r.Offset, r.Offset+r.Length-1, humanBytes(r.Length))
}

// oneLine folds a message onto one line for a table cell.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// orDash renders an empty cell as "-".
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
