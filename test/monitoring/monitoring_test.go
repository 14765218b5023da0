// Package monitoring_test checks the monitoring bundle of config/monitoring
// (and its copies in the Helm chart) against the code: every metric a Grafana
// query or an alert expression names must be one the manager or the agent
// registers, so renaming a metric in the code, or mistyping one in the
// dashboard or the rules, fails here instead of showing an empty panel or an
// alert that never fires.
package monitoring_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/yaml"

	"github.com/tandem-storage/tandem/controllers"
	"github.com/tandem-storage/tandem/dataplane/agent"
)

var repoRoot = func() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}()

// synthetic are the series Prometheus makes itself for every target.
var synthetic = map[string]bool{"up": true}

// exported is what /metrics of the manager and of the agent can serve: each
// metric's name, and whether it is a histogram or a summary (whose series
// are <name>_bucket or quantiles, <name>_sum and <name>_count).
type exported struct {
	names     map[string]bool
	histogram map[string]bool
}

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

// registered collects the names from the collectors the code registers: the
// manager's own (controllers.MetricsCollectors, registered with
// controller-runtime's registry, which also serves Go's and the process's)
// and the agent's (what its /metrics handler registers). A Vec without
// children gathers nothing, so the names come from Describe; Collect and
// Gather tell histograms apart.
func registered(t *testing.T) exported {
	t.Helper()
	e := exported{names: map[string]bool{}, histogram: map[string]bool{}}
	cols := append(controllers.MetricsCollectors(), (&agent.Agent{}).MetricsCollectors()...)
	for _, c := range cols {
		ch := make(chan *prometheus.Desc, 64)
		go func() { c.Describe(ch); close(ch) }()
		for d := range ch {
			m := fqName.FindStringSubmatch(d.String())
			if m == nil {
				t.Fatalf("cannot read the name of %s", d)
			}
			e.names[m[1]] = true
		}
	}
	// The manager's collectors hold no agent state: collect them for the
	// types of those that have no labels (the histogram).
	for _, c := range controllers.MetricsCollectors() {
		ch := make(chan prometheus.Metric, 64)
		go func() { c.Collect(ch); close(ch) }()
		for m := range ch {
			var pb dto.Metric
			if err := m.Write(&pb); err != nil {
				t.Fatal(err)
			}
			if pb.Histogram != nil || pb.Summary != nil {
				e.histogram[fqName.FindStringSubmatch(m.Desc().String())[1]] = true
			}
		}
	}
	mfs, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		t.Fatalf("gather the manager's registry: %v", err)
	}
	for _, mf := range mfs {
		e.names[mf.GetName()] = true
		if t := mf.GetType(); t == dto.MetricType_HISTOGRAM || t == dto.MetricType_SUMMARY || t == dto.MetricType_GAUGE_HISTOGRAM {
			e.histogram[mf.GetName()] = true
		}
	}
	for _, want := range []string{"tandem_volumepair_phase", "tandem_volume_writable", "tandem_agent_inflight_bytes", "go_goroutines", "process_resident_memory_bytes"} {
		if !e.names[want] {
			t.Fatalf("registered names lack %s: the collection is broken (%d names)", want, len(e.names))
		}
	}
	if !e.histogram["tandem_failover_duration_seconds"] {
		t.Fatal("tandem_failover_duration_seconds is not seen as a histogram")
	}
	return e
}

// known tells whether a series name is served: a registered name, a
// histogram's or summary's series, or one Prometheus makes.
func (e exported) known(name string) bool {
	if e.names[name] || synthetic[name] {
		return true
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suf); ok && e.histogram[base] {
			return true
		}
	}
	return false
}

// aggregators and keywords are PromQL words that are not metric names.
var (
	aggregators = set("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio")
	keywords    = set("and", "or", "unless", "offset", "bool", "inf", "nan", "atan2")
	// Followed by a list of label names in parentheses.
	labelLists = set("by", "without", "on", "ignoring", "group_left", "group_right")
)

func set(s ...string) map[string]bool {
	m := map[string]bool{}
	for _, x := range s {
		m[x] = true
	}
	return m
}

// metricNames returns the metric names a PromQL expression selects: every
// identifier that is not a function call, an aggregation, a keyword, a label
// name (in matchers and in by/without/on/ignoring/group_* lists), a string,
// a number or duration, or a Grafana variable ($x, ${x}).
func metricNames(expr string) ([]string, error) {
	s := expr
	var out []string
	skipTo := func(i int, open, close byte) (int, error) {
		depth := 0
		for j := i; j < len(s); j++ {
			switch c := s[j]; {
			case c == '"' || c == '\'' || c == '`':
				k, err := skipString(s, j)
				if err != nil {
					return 0, err
				}
				j = k - 1
			case c == open:
				depth++
			case c == close:
				depth--
				if depth == 0 {
					return j + 1, nil
				}
			}
		}
		return 0, fmt.Errorf("unbalanced %c in %q", open, expr)
	}
	nextNonSpace := func(i int) int {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
			i++
		}
		return i
	}
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			j, err := skipString(s, i)
			if err != nil {
				return nil, err
			}
			i = j
		case c == '{':
			j, err := skipTo(i, '{', '}')
			if err != nil {
				return nil, err
			}
			i = j
		case c == '[':
			j, err := skipTo(i, '[', ']')
			if err != nil {
				return nil, err
			}
			i = j
		case c == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '$':
			i++
			if i < len(s) && s[i] == '{' {
				j, err := skipTo(i, '{', '}')
				if err != nil {
					return nil, err
				}
				i = j
				continue
			}
			for i < len(s) && isIdent(s[i]) {
				i++
			}
		case isDigit(c) || (c == '.' && i+1 < len(s) && isDigit(s[i+1])):
			// Numbers, durations (5m, 1h30m), hex and exponents.
			for i < len(s) && (isIdent(s[i]) || s[i] == '.') && s[i] != ':' {
				i++
			}
		case isIdentStart(c):
			j := i
			for j < len(s) && isIdent(s[j]) {
				j++
			}
			word := s[i:j]
			i = j
			k := nextNonSpace(i)
			switch {
			case labelLists[word]:
				if k < len(s) && s[k] == '(' {
					j, err := skipTo(k, '(', ')')
					if err != nil {
						return nil, err
					}
					i = j
				}
			case aggregators[word], keywords[word]:
			case k < len(s) && s[k] == '(':
				// A function call.
			default:
				out = append(out, word)
			}
		default:
			i++
		}
	}
	return out, nil
}

func skipString(s string, i int) (int, error) {
	q := s[i]
	for j := i + 1; j < len(s); j++ {
		if s[j] == '\\' && q != '`' {
			j++
			continue
		}
		if s[j] == q {
			return j + 1, nil
		}
	}
	return 0, fmt.Errorf("unterminated string in %q", s)
}

func isDigit(c byte) bool      { return c >= '0' && c <= '9' }
func isIdentStart(c byte) bool { return c == '_' || c == ':' || (c|0x20 >= 'a' && c|0x20 <= 'z') }
func isIdent(c byte) bool      { return isIdentStart(c) || isDigit(c) }

func TestMetricNames(t *testing.T) {
	for _, tt := range []struct {
		expr string
		want []string
	}{
		{`up`, []string{"up"}},
		{`rate(a_total{job="x", le=~"a{b}"}[5m]) > 0`, []string{"a_total"}},
		{`sum by (namespace, name) (increase(b_total[$__rate_interval])) / on (name) group_left(phase) c`, []string{"b_total", "c"}},
		{`sum(d) without (instance) or absent(e{job='f'}) unless g offset 1h30m`, []string{"d", "e", "g"}},
		{`histogram_quantile(0.95, sum by (le) (rate(h_bucket{x="$v"}[1h]))) * 1e3 + 0x1f`, []string{"h_bucket"}},
		{`topk(5, i) and bool j:recorded:rate5m{a="}"}`, []string{"i", "j:recorded:rate5m"}},
		{`max by (volume) (k{volume=~"${volume}"}) # a comment naming not_a_metric`, []string{"k"}},
	} {
		got, err := metricNames(tt.expr)
		if err != nil {
			t.Errorf("metricNames(%q): %v", tt.expr, err)
			continue
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("metricNames(%q) = %q, want %q", tt.expr, got, tt.want)
		}
	}
	for _, bad := range []string{`a{b="c"`, `rate(a[5m)`, `a{b="c}`} {
		if _, err := metricNames(bad); err == nil {
			t.Errorf("metricNames(%q) accepted an unbalanced expression", bad)
		}
	}
}

// query is one PromQL expression and where it is.
type query struct{ where, expr string }

var labelValues = regexp.MustCompile(`^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$`)

// dashboardQueries returns every Prometheus query of a Grafana dashboard:
// the panels' targets (rows' nested panels too) and the query variables
// (label_values(<selector>, label) contributes the selector).
func dashboardQueries(t *testing.T, b []byte) []query {
	t.Helper()
	var d map[string]any
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	var qs []query
	var walk func(where string, v any)
	walk = func(where string, v any) {
		switch v := v.(type) {
		case map[string]any:
			if title, ok := v["title"].(string); ok {
				where = where + "/" + title
			}
			for k, x := range v {
				if s, ok := x.(string); ok && k == "expr" {
					qs = append(qs, query{where, s})
					continue
				}
				walk(where, x)
			}
		case []any:
			for _, x := range v {
				walk(where, x)
			}
		}
	}
	walk("panels", d["panels"])
	tl, _ := d["templating"].(map[string]any)
	list, _ := tl["list"].([]any)
	for _, x := range list {
		v, _ := x.(map[string]any)
		if v["type"] != "query" {
			continue
		}
		q := v["query"]
		if m, ok := q.(map[string]any); ok {
			q = m["query"]
		}
		s, _ := q.(string)
		if m := labelValues.FindStringSubmatch(s); m != nil {
			s = m[1]
		}
		if s == "" {
			t.Errorf("dashboard variable %v has no query this test understands", v["name"])
			continue
		}
		qs = append(qs, query{fmt.Sprintf("variable %v", v["name"]), s})
	}
	return qs
}

// rule is one alerting or recording rule of a Prometheus rules file.
type rule struct {
	Alert       string            `json:"alert"`
	Record      string            `json:"record"`
	Expr        string            `json:"expr"`
	For         string            `json:"for"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

func readRules(t *testing.T, b []byte) []rule {
	t.Helper()
	var f struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []rule `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(b, &f); err != nil {
		t.Fatalf("rules: %v", err)
	}
	var rs []rule
	for _, g := range f.Groups {
		rs = append(rs, g.Rules...)
	}
	return rs
}

func ruleQueries(rs []rule) []query {
	var qs []query
	for _, r := range rs {
		qs = append(qs, query{"rule " + r.Alert + r.Record, r.Expr})
	}
	return qs
}

// unknownMetrics returns "where: name" for every metric a query names that
// the code does not export.
func unknownMetrics(t *testing.T, e exported, qs []query) []string {
	t.Helper()
	var bad []string
	for _, q := range qs {
		names, err := metricNames(q.expr)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", q.where, err))
			continue
		}
		if len(names) == 0 {
			bad = append(bad, fmt.Sprintf("%s: %q selects no metric", q.where, q.expr))
		}
		for _, n := range names {
			if !e.known(n) {
				bad = append(bad, fmt.Sprintf("%s: %s", q.where, n))
			}
		}
	}
	sort.Strings(bad)
	return bad
}

func read(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const (
	dashboardFile = "config/monitoring/grafana-dashboard.json"
	rulesFile     = "config/monitoring/prometheus-rules.yaml"
)

func TestDashboardQueriesNameExportedMetrics(t *testing.T) {
	e := registered(t)
	b := read(t, dashboardFile)
	qs := dashboardQueries(t, b)
	if len(qs) < 20 {
		t.Fatalf("found only %d queries in %s: the walk is broken", len(qs), dashboardFile)
	}
	if bad := unknownMetrics(t, e, qs); len(bad) > 0 {
		t.Errorf("%s names metrics the manager and the agent do not export:\n  %s", dashboardFile, strings.Join(bad, "\n  "))
	}

	// The check must be able to fail: a renamed metric in the dashboard, and
	// a metric the code would no longer register.
	renamed := bytes.ReplaceAll(b, []byte("tandem_volume_writes_total"), []byte("tandem_volume_write_total"))
	if bad := unknownMetrics(t, e, dashboardQueries(t, renamed)); !slices.ContainsFunc(bad, func(s string) bool { return strings.HasSuffix(s, ": tandem_volume_write_total") }) {
		t.Errorf("a dashboard naming tandem_volume_write_total passed the check (%v)", bad)
	}
	delete(e.names, "tandem_volumepair_out_of_sync_bytes")
	if bad := unknownMetrics(t, e, qs); !slices.ContainsFunc(bad, func(s string) bool { return strings.HasSuffix(s, ": tandem_volumepair_out_of_sync_bytes") }) {
		t.Errorf("the dashboard passed although tandem_volumepair_out_of_sync_bytes is not registered (%v)", bad)
	}
}

// The alerts the bundle promises (issue 18, docs/monitoring.md).
var wantAlerts = []string{
	"TandemVolumeDegraded",         // a pair degraded: its writer without its peer
	"TandemVolumeOutOfSyncTooLong", // out of sync for too long
	"TandemVolumePairFailedOver",   // a failover happened
	"TandemVolumePairCopyStuck",    // a copy (resync) stuck
	"TandemVolumePairPending",      // a new pair that cannot start (issue 19)
	"TandemAgentDown",              // an agent down
}

func TestAlertRules(t *testing.T) {
	e := registered(t)
	b := read(t, rulesFile)
	rs := readRules(t, b)
	if bad := unknownMetrics(t, e, ruleQueries(rs)); len(bad) > 0 {
		t.Errorf("%s names metrics the manager and the agent do not export:\n  %s", rulesFile, strings.Join(bad, "\n  "))
	}
	renamed := bytes.ReplaceAll(b, []byte("tandem_volumepair_copy_done_bytes"), []byte("tandem_volumepair_copied_bytes"))
	if bad := unknownMetrics(t, e, ruleQueries(readRules(t, renamed))); !slices.ContainsFunc(bad, func(s string) bool { return strings.HasSuffix(s, ": tandem_volumepair_copied_bytes") }) {
		t.Errorf("rules naming tandem_volumepair_copied_bytes passed the check (%v)", bad)
	}

	docs := string(read(t, "docs/monitoring.md"))
	var alerts []string
	for _, r := range rs {
		if r.Alert == "" {
			continue
		}
		alerts = append(alerts, r.Alert)
		for _, a := range []string{"summary", "description", "runbook_url"} {
			if strings.TrimSpace(r.Annotations[a]) == "" {
				t.Errorf("alert %s has no %s annotation", r.Alert, a)
			}
		}
		if s := r.Labels["severity"]; s != "warning" && s != "critical" && s != "info" {
			t.Errorf("alert %s has severity %q, want warning, critical or info", r.Alert, s)
		}
		// The runbook link points at the alert's section of docs/monitoring.md.
		anchor := "docs/monitoring.md#" + strings.ToLower(r.Alert)
		if !strings.HasSuffix(r.Annotations["runbook_url"], anchor) {
			t.Errorf("alert %s: runbook_url %q does not end in %s", r.Alert, r.Annotations["runbook_url"], anchor)
		}
		if !strings.Contains(docs, "\n### "+r.Alert+"\n") {
			t.Errorf("docs/monitoring.md has no section \"### %s\"", r.Alert)
		}
	}
	for _, w := range wantAlerts {
		if !slices.Contains(alerts, w) {
			t.Errorf("%s lacks alert %s", rulesFile, w)
		}
	}
}

// TestChartCopies: the chart serves the files of config/monitoring as they
// are (hack/sync-chart-crds.sh copies them; the chart cannot read outside
// itself).
func TestChartCopies(t *testing.T) {
	if a, b := read(t, dashboardFile), read(t, "charts/tandem/files/grafana-dashboard.json"); !bytes.Equal(a, b) {
		t.Errorf("charts/tandem/files/grafana-dashboard.json differs from %s; run `make manifests`", dashboardFile)
	}
	a, b := read(t, rulesFile), read(t, "charts/tandem/files/prometheus-rules.yaml")
	if _, rest, ok := bytes.Cut(b, []byte("\n")); !ok || !bytes.HasPrefix(b, []byte("# Generated")) || !bytes.Equal(a, rest) {
		t.Errorf("charts/tandem/files/prometheus-rules.yaml is not %s behind a header; run `make manifests`", rulesFile)
	}
}
