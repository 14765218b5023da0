package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/tandem-storage/tandem/hack/image/ociarchive"
	"github.com/tandem-storage/tandem/internal/csi"
)

func TestParseArgs(t *testing.T) {
	req := []string{"--name", "x.io/y:z", "--out", "o.tar", "--file", "/a=b"}
	tests := []struct {
		name    string
		args    []string
		check   func(t *testing.T, o options)
		wantErr string
	}{{
		name: "everything",
		args: []string{"--name", "x.io/y:z", "--out", "o.tar", "--file", "/usr/bin/a=bin/a", "--file", "/b=c=d",
			"--user", "1:2", "--entrypoint", "/usr/bin/a", "--entrypoint", "--flag", "--cmd", "x",
			"--env", "A=1", "--env", "B=", "--label", "k=v=w", "--label", "e=", "--os", "linux", "--arch", "riscv64"},
		check: func(t *testing.T, o options) {
			want := ociarchive.Spec{
				Files:      []ociarchive.File{{Path: "/usr/bin/a", Source: "bin/a"}, {Path: "/b", Source: "c=d"}},
				User:       "1:2",
				Entrypoint: []string{"/usr/bin/a", "--flag"},
				Cmd:        []string{"x"},
				Env:        []string{"A=1", "B="},
				Labels:     map[string]string{"k": "v=w", "e": ""},
				OS:         "linux",
				Arch:       "riscv64",
				CreatedBy:  "hack/image",
			}
			if o.name != "x.io/y:z" || o.out != "o.tar" || !reflect.DeepEqual(o.spec, want) {
				t.Errorf("got %+v\nwant spec %+v", o, want)
			}
		},
	}, {
		name:    "no name",
		args:    []string{"--out", "o.tar", "--file", "/a=b"},
		wantErr: "required",
	}, {
		name:    "no file",
		args:    []string{"--name", "x.io/y:z", "--out", "o.tar"},
		wantErr: "--file is required",
	}, {
		name:    "file without source",
		args:    append(req, "--file", "/a"),
		wantErr: "IMAGE_PATH=LOCAL_FILE",
	}, {
		name:    "label without value",
		args:    append(req, "--label", "k"),
		wantErr: "KEY=VALUE",
	}, {
		name:    "label twice",
		args:    append(req, "--label", "k=1", "--label", "k=2"),
		wantErr: "twice",
	}, {
		name:    "env without =",
		args:    append(req, "--env", "PATH"),
		wantErr: "KEY=VALUE",
	}, {
		name:    "stray argument",
		args:    append(req, "extra"),
		wantErr: "unexpected",
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseArgs(tc.args, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, o)
		})
	}
}

func TestRun(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "pause")
	if err := os.WriteFile(bin, []byte("not really a binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "images", "pause.tar")
	var stdout strings.Builder
	err := run([]string{"--name", "tandem.local/pause:1", "--out", out, "--arch", "amd64",
		"--user", "65535:65535", "--entrypoint", "/pause", "--file", "/pause=" + bin}, &stdout, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(stdout.String(), "tandem.local/pause:1 sha256:") {
		t.Errorf("output %q, want the name and the digest", stdout.String())
	}
	tag, err := name.NewTag("tandem.local/pause:1")
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Config.User != "65535:65535" || !reflect.DeepEqual(cf.Config.Entrypoint, []string{"/pause"}) {
		t.Errorf("config %+v", cf.Config)
	}
}

// TestDockerfileMatchesMakeImage checks that the Dockerfile's final stage
// and the Makefile's image target describe the same image: the binaries,
// their build flags, their paths, and the user, entrypoint, environment
// and labels.
func TestDockerfileMatchesMakeImage(t *testing.T) {
	df := readDockerfile(t, "../../Dockerfile")
	mk := readMakefile(t, "../../Makefile")

	cmds := strings.Fields(mk.vars["IMAGE_CMDS"])
	if len(cmds) == 0 {
		t.Fatal("Makefile: IMAGE_CMDS is empty")
	}
	// make image's flags, parsed by this program's own parser.
	config, err := shellWords(mk.vars["IMAGE_CONFIG"])
	if err != nil {
		t.Fatalf("Makefile: IMAGE_CONFIG: %v", err)
	}
	o, err := parseArgs(append(config, "--name", "x.io/y:z", "--out", "o.tar", "--file", "/a=b"), io.Discard)
	if err != nil {
		t.Fatalf("Makefile: IMAGE_CONFIG: %v", err)
	}

	if df.from != "scratch" {
		t.Errorf("Dockerfile: final stage FROM %s, make image starts from nothing (scratch)", df.from)
	}
	if df.user != o.spec.User {
		t.Errorf("USER: Dockerfile %q, Makefile %q", df.user, o.spec.User)
	}
	if !reflect.DeepEqual(df.entrypoint, o.spec.Entrypoint) {
		t.Errorf("ENTRYPOINT: Dockerfile %q, Makefile %q", df.entrypoint, o.spec.Entrypoint)
	}
	if !reflect.DeepEqual(df.env, o.spec.Env) {
		t.Errorf("ENV: Dockerfile %q, Makefile %q", df.env, o.spec.Env)
	}
	if !reflect.DeepEqual(df.labels, o.spec.Labels) {
		t.Errorf("LABEL: Dockerfile %q, Makefile %q", df.labels, o.spec.Labels)
	}
	if df.cmd != nil {
		t.Errorf("Dockerfile: CMD %q, make image sets none", df.cmd)
	}

	// The same files: the Dockerfile copies /out/<cmd> into /usr/local/bin/,
	// make image passes --file /usr/local/bin/<cmd>=bin/image/<cmd>.
	var wantCopies []string
	for _, c := range cmds {
		wantCopies = append(wantCopies, "/out/"+c+" -> /usr/local/bin/"+c)
	}
	if !reflect.DeepEqual(df.copies, wantCopies) {
		t.Errorf("Dockerfile COPY into the final stage:\n got %q\nwant %q (IMAGE_CMDS)", df.copies, wantCopies)
	}
	if !strings.Contains(mk.recipe("image"), "--file /usr/local/bin/$(c)=$(BIN)/image/$(c)") {
		t.Errorf("Makefile: the image recipe does not put $(IMAGE_CMDS) at /usr/local/bin:\n%s", mk.recipe("image"))
	}

	// The same filesystem tools: make image takes them from the list
	// hack/image/fstools.sh prints, the Dockerfile from the files it copies.
	if !df.fstoolsRun || df.fstools != "/out/ -> /" {
		t.Errorf("Dockerfile: want a stage running hack/image/fstools.sh --copy /out and COPY --from=fstools /out/ / in the final stage (got run %t, copy %q)", df.fstoolsRun, df.fstools)
	}
	if !strings.Contains(mk.recipe("image"), "hack/image/fstools.sh") {
		t.Errorf("Makefile: the image recipe does not add hack/image/fstools.sh's files:\n%s", mk.recipe("image"))
	}
	// ... and they are every program the node plugin runs.
	out, err := exec.Command("bash", filepath.Join("..", "..", "hack", "image", "fstools.sh")).CombinedOutput()
	if err != nil {
		t.Fatalf("hack/image/fstools.sh: %v\n%s", err, out)
	}
	for fs, tools := range csi.FilesystemTools {
		for _, tool := range []string{tools.Format, tools.Grow} {
			if !strings.Contains(string(out), "/usr/sbin/"+tool+"=") {
				t.Errorf("hack/image/fstools.sh does not put %s (the node plugin runs it for %s) into the image:\n%s", tool, fs, out)
			}
		}
	}

	// Built the same way: static, with the same flags, the same packages.
	goflags := mk.vars["IMAGE_GOFLAGS"]
	if !strings.Contains(df.goBuild, " "+goflags+" ") {
		t.Errorf("Dockerfile: go build %q lacks IMAGE_GOFLAGS %q", df.goBuild, goflags)
	}
	var pkgs []string
	for _, f := range strings.Fields(df.goBuild) {
		if strings.HasPrefix(f, "./") {
			pkgs = append(pkgs, strings.TrimPrefix(f, "./cmd/"))
		}
	}
	if !reflect.DeepEqual(pkgs, cmds) {
		t.Errorf("Dockerfile builds %q, Makefile IMAGE_CMDS %q", pkgs, cmds)
	}
	if !df.cgoDisabled {
		t.Error("Dockerfile: the build stage does not set CGO_ENABLED=0")
	}
	if r := mk.recipe("image"); !strings.Contains(r, "CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) go build $(IMAGE_GOFLAGS)") {
		t.Errorf("Makefile: the image recipe does not build with CGO_ENABLED=0 and $(IMAGE_GOFLAGS):\n%s", r)
	}
}

// dockerfile is what the test reads of a Dockerfile.
type dockerfile struct {
	from        string // the final stage's base
	user        string
	entrypoint  []string
	cmd         []string
	env         []string
	labels      map[string]string
	copies      []string // "src -> dst" into the final stage
	fstools     string   // "src -> dst" of the final stage's COPY --from=fstools
	fstoolsRun  bool     // a stage runs hack/image/fstools.sh --copy /out
	goBuild     string   // the go build command of the stages before
	cgoDisabled bool
}

// readDockerfile parses the instructions this repository's Dockerfile uses.
func readDockerfile(t *testing.T, path string) dockerfile {
	t.Helper()
	var df dockerfile
	stage := 0
	for _, line := range logicalLines(t, path) {
		if strings.HasPrefix(line, "#") {
			continue
		}
		instr, rest, _ := strings.Cut(line, " ")
		rest = strings.TrimSpace(rest)
		if strings.ToUpper(instr) == "FROM" {
			stage++
			df = dockerfile{goBuild: df.goBuild, cgoDisabled: df.cgoDisabled, fstoolsRun: df.fstoolsRun}
			fields := strings.Fields(rest)
			for _, f := range fields {
				if !strings.HasPrefix(f, "--") {
					df.from = f
					break
				}
			}
			continue
		}
		words, err := shellWords(rest)
		if err != nil {
			t.Fatalf("%s: %s: %v", path, line, err)
		}
		switch strings.ToUpper(instr) {
		case "RUN":
			if i := strings.Index(rest, "go build "); i >= 0 {
				df.goBuild = rest[i:]
			}
			if strings.Contains(rest, "fstools.sh --copy /out") {
				df.fstoolsRun = true
			}
		case "ENV":
			for _, w := range words {
				if w == "CGO_ENABLED=0" {
					df.cgoDisabled = true
				}
			}
			df.env = append(df.env, words...)
		case "LABEL":
			if df.labels == nil {
				df.labels = map[string]string{}
			}
			for _, w := range words {
				k, v, ok := strings.Cut(w, "=")
				if !ok {
					t.Fatalf("%s: LABEL %q: want KEY=VALUE", path, w)
				}
				df.labels[k] = v
			}
		case "USER":
			df.user = rest
		case "ENTRYPOINT", "CMD":
			var v []string
			if err := json.Unmarshal([]byte(rest), &v); err != nil {
				t.Fatalf("%s: %s: want the exec (JSON) form: %v", path, line, err)
			}
			if strings.ToUpper(instr) == "CMD" {
				df.cmd = v
			} else {
				df.entrypoint = v
			}
		case "COPY":
			var args []string
			fromFSTools := false
			for _, w := range words {
				if w == "--from=fstools" {
					fromFSTools = true
				}
				if !strings.HasPrefix(w, "--") {
					args = append(args, w)
				}
			}
			if fromFSTools && len(args) == 2 {
				df.fstools = args[0] + " -> " + args[1]
				continue
			}
			if len(args) < 2 {
				t.Fatalf("%s: %s: want sources and a destination", path, line)
			}
			dst := args[len(args)-1]
			for _, src := range args[:len(args)-1] {
				d := dst
				if strings.HasSuffix(dst, "/") {
					d = dst + filepath.Base(src)
				}
				df.copies = append(df.copies, src+" -> "+d)
			}
		}
	}
	if stage < 2 {
		t.Fatalf("%s: want a build stage and a final stage, found %d stages", path, stage)
	}
	return df
}

// makefile is what the test reads of a Makefile.
type makefile struct {
	vars  map[string]string // simply expanded (":=") variables
	lines []string          // logical lines
}

func readMakefile(t *testing.T, path string) makefile {
	t.Helper()
	mf := makefile{vars: map[string]string{}, lines: logicalLines(t, path)}
	for _, l := range mf.lines {
		if k, v, ok := strings.Cut(l, ":="); ok && !strings.ContainsAny(strings.TrimRight(k, " "), " \t") {
			mf.vars[strings.TrimRight(k, " ")] = strings.TrimSpace(v)
		}
	}
	for _, k := range []string{"IMAGE_CMDS", "IMAGE_GOFLAGS", "IMAGE_CONFIG"} {
		if mf.vars[k] == "" {
			t.Fatalf("%s: no %s := ...", path, k)
		}
	}
	return mf
}

// recipe returns a rule's recipe, one logical line per line.
func (mf makefile) recipe(target string) string {
	var out []string
	in := false
	for _, l := range mf.lines {
		switch {
		case strings.HasPrefix(l, target+":"):
			in = true
		case in && strings.HasPrefix(l, "\t"):
			out = append(out, strings.TrimSpace(l))
		case in:
			return strings.Join(out, "\n")
		}
	}
	return strings.Join(out, "\n")
}

// logicalLines returns a file's non-empty lines with backslash-newline
// continuations joined (each continuation's indentation becomes one space).
// The first physical line keeps its indentation (a recipe's tab).
func logicalLines(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	cur, cont := "", false
	for _, l := range strings.Split(string(data), "\n") {
		if cont {
			l = " " + strings.TrimLeft(l, " \t")
		}
		if strings.HasSuffix(l, "\\") {
			cur += strings.TrimRight(strings.TrimSuffix(l, "\\"), " \t")
			cont = true
			continue
		}
		cur += l
		cont = false
		if strings.TrimSpace(cur) != "" {
			out = append(out, cur)
		}
		cur = ""
	}
	return out
}

// shellWords splits s into words the way a POSIX shell (and Dockerfile
// LABEL/ENV) would without expansions: whitespace separates words,
// '...' is literal, "..." allows \" and \\, a backslash outside quotes
// escapes the next character.
func shellWords(s string) ([]string, error) {
	var (
		words []string
		cur   strings.Builder
		in    bool // inside a word
	)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t':
			if in {
				words = append(words, cur.String())
				cur.Reset()
				in = false
			}
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("unterminated ' in %q", s)
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			in = true
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && (s[i+1] == '"' || s[i+1] == '\\') {
					i++
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("unterminated \" in %q", s)
			}
			in = true
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			in = true
		default:
			cur.WriteByte(c)
			in = true
		}
	}
	if in {
		words = append(words, cur.String())
	}
	return words, nil
}

func TestShellWords(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"  a  b\tc ", []string{"a", "b", "c"}},
		{`--label 'k=a b' x`, []string{"--label", "k=a b", "x"}},
		{`k="a \"b\" c" d=e`, []string{`k=a "b" c`, "d=e"}},
		{`a\ b ''`, []string{"a b", ""}},
	}
	for _, tc := range tests {
		got, err := shellWords(tc.in)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("shellWords(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{`'a`, `"a`} {
		if _, err := shellWords(bad); err == nil {
			t.Errorf("shellWords(%q): no error", bad)
		}
	}
}
