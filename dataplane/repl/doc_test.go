package repl

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"regexp"
	"testing"
)

// TestDocFwdReplyOutcomes: the package doc is the wire specification, so it
// must name every FwdReply outcome a peer may send (dataplane/volume
// forward.go: 0 ok, 1 error, fwdReissue = 2). Offset 2 was sent but not
// documented.
func TestDocFwdReplyOutcomes(t *testing.T) {
	// parser.ParseDir is deprecated: parse the directory's files one by one
	// and keep package repl's, as pkgs["repl"] did.
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	doc := ""
	for _, name := range files {
		f, err := parser.ParseFile(fset, name, nil, parser.ParseComments|parser.PackageClauseOnly)
		if err != nil {
			t.Fatal(err)
		}
		if f.Name.Name == "repl" && f.Doc != nil {
			doc += f.Doc.Text()
		}
	}
	if doc == "" {
		t.Fatal("package repl has no package doc")
	}
	for _, want := range []string{
		`FwdReply .*offset 0: ok, 1: error, 2: re-issue`,
		`(?m)^\s*2\s+re-issue\s+the writer stepped down`,
		`stream is no longer used`,
		`issued again`,
	} {
		if !regexp.MustCompile(want).MatchString(doc) {
			t.Errorf("package doc does not match %q", want)
		}
	}
}
