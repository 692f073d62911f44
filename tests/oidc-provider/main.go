// oidc-provider: a real OpenID Provider for kcloud's tests, built on
// github.com/zitadel/oidc/v3's provider package and its example storage and
// login page (a certified OpenID Connect implementation; see README.md for why
// not Dex). It adds what the example lacks and Dex has: users read from a file,
// each with groups, and the `groups` and `preferred_username` claims in the ID
// token.
//
//	oidc-provider --listen 127.0.0.1:5556 --issuer http://127.0.0.1:5556 \
//	    --users users.json --client kcloud:secret:http://127.0.0.1:8080/api/v1/auth/oidc/callback
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"os"
	"strings"

	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// fileUser is one entry of --users.
type fileUser struct {
	ID       string   `json:"id"`
	Username string   `json:"username"`
	Password string   `json:"password"`
	Email    string   `json:"email"`
	Groups   []string `json:"groups"`
}

type userStore struct {
	users map[string]*storage.User
}

func (u userStore) GetUserByID(id string) *storage.User { return u.users[id] }
func (u userStore) GetUserByUsername(name string) *storage.User {
	for _, user := range u.users {
		if user.Username == name {
			return user
		}
	}
	return nil
}
func (u userStore) ExampleClientID() string { return "service" }

// groupStorage is the example storage plus groups in the ID token and userinfo.
type groupStorage struct {
	*storage.Storage
	users  userStore
	groups map[string][]string
}

func (s *groupStorage) add(userinfo *oidc.UserInfo, subject string, scopes []string) {
	user := s.users.GetUserByID(subject)
	if user == nil {
		return
	}
	userinfo.PreferredUsername = user.Username
	userinfo.Email = user.Email
	userinfo.EmailVerified = oidc.Bool(user.EmailVerified)
	for _, scope := range scopes {
		if scope == "groups" {
			userinfo.AppendClaims("groups", s.groups[subject])
		}
	}
}

// groupClient lets a registered client ask for the `groups` scope (the example
// clients allow only the example's own custom scope).
type groupClient struct{ op.Client }

func (c groupClient) IsScopeAllowed(scope string) bool {
	return scope == "groups" || c.Client.IsScopeAllowed(scope)
}

func (s *groupStorage) GetClientByClientID(ctx context.Context, id string) (op.Client, error) {
	c, err := s.Storage.GetClientByClientID(ctx, id)
	if err != nil {
		return nil, err
	}
	return groupClient{c}, nil
}

func (s *groupStorage) SetUserinfoFromRequest(ctx context.Context, userinfo *oidc.UserInfo, req op.IDTokenRequest, scopes []string) error {
	if err := s.Storage.SetUserinfoFromRequest(ctx, userinfo, req, scopes); err != nil {
		return err
	}
	s.add(userinfo, req.GetSubject(), scopes)
	return nil
}

func (s *groupStorage) SetUserinfoFromToken(ctx context.Context, userinfo *oidc.UserInfo, tokenID, subject, origin string) error {
	if err := s.Storage.SetUserinfoFromToken(ctx, userinfo, tokenID, subject, origin); err != nil {
		return err
	}
	s.add(userinfo, userinfo.Subject, []string{"groups"})
	return nil
}

type clientFlags []string

func (c *clientFlags) String() string     { return strings.Join(*c, ",") }
func (c *clientFlags) Set(v string) error { *c = append(*c, v); return nil }

func main() {
	listen := flag.String("listen", "127.0.0.1:5556", "address to serve on")
	issuer := flag.String("issuer", "", "issuer URL (default http://<listen>)")
	usersFile := flag.String("users", "", "JSON list of {id, username, password, email, groups}")
	var clients clientFlags
	flag.Var(&clients, "client", "id:secret:redirect_uri (repeatable)")
	flag.Parse()
	if *issuer == "" {
		*issuer = "http://" + *listen
	}
	data, err := os.ReadFile(*usersFile)
	if err != nil {
		log.Fatalf("--users: %v", err)
	}
	var list []fileUser
	if err := json.Unmarshal(data, &list); err != nil {
		log.Fatalf("--users: %v", err)
	}
	users := userStore{users: map[string]*storage.User{}}
	groups := map[string][]string{}
	for _, u := range list {
		users.users[u.ID] = &storage.User{
			ID: u.ID, Username: u.Username, Password: u.Password,
			Email: u.Email, EmailVerified: true, FirstName: u.Username, LastName: "Test",
		}
		groups[u.ID] = u.Groups
	}
	registered := map[string]*storage.Client{}
	for _, c := range clients {
		parts := strings.SplitN(c, ":", 3)
		if len(parts) != 3 {
			log.Fatalf("--client %q: want id:secret:redirect_uri", c)
		}
		registered[parts[0]] = storage.WebClient(parts[0], parts[1], parts[2])
	}
	st := &groupStorage{
		Storage: storage.NewStorageWithClients(users, registered),
		users:   users,
		groups:  groups,
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	router := exampleop.SetupServer(*issuer, st, logger, false)
	fmt.Printf("oidc-provider: issuer %s on %s\n", *issuer, *listen)
	server := &http.Server{Addr: *listen, Handler: router}
	log.Fatal(server.ListenAndServe())
}
