package repl

import (
	"go/parser"
	"go/token"
	"regexp"
	"testing"
)

// TestDocFwdReplyOutcomes: the package doc is the wire specification, so it
// must name every FwdReply outcome a peer may send (dataplane/volume
// forward.go: 0 ok, 1 error, fwdReissue = 2). Offset 2 was sent but not
// documented.
func TestDocFwdReplyOutcomes(t *testing.T) {
	pkgs, err := parser.ParseDir(token.NewFileSet(), ".", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	doc := ""
	for _, f := range pkgs["repl"].Files {
		if f.Doc != nil {
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
