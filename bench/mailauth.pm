package mailauth;
use Digest::HMAC_MD5 qw/ hmac_md5_hex /;
use nginx;
use DBI;
use URI::Escape;
my $dsn="DBI:mysql:database=postfix;host=127.0.0.1;port=@MYSQL_PORT@";
our $dbh=DBI->connect_cached($dsn, 'mail-proxy', 'p@ssword', {AutoCommit => 1, mysql_auto_reconnect => 1});

our $auth_ok;
our $protocol_ports={};
$protocol_ports->{'pop3'}=@POP3_PORT@;
$protocol_ports->{'imap'}=@IMAP_PORT@;
$protocol_ports->{'smtp'}=25;

sub handler {
  if (!$dbh->ping()) {
    ($sec,$min,$hour,$mday,$mon,$year,$wday,$yday,$isdst)=localtime(time);
    $dbh=DBI->connect_cached($dsn, 'mail-proxy', 'p@ssword', {AutoCommit => 1, mysql_auto_reconnect => 1});
    printf STDERR "%4d/%02d/%02d %02d:%02d:%02d [notice] : MySQL server connection lost. Reconnecting.\n", $year+1900,$mon+1,$mday,$hour,$min,$sec;
  }

  my $r = shift;

  my $auth_method = $r->header_in("Auth-Method");
  my $username = uri_unescape($r->header_in("Auth-User"));
  my $password = uri_unescape($r->header_in("Auth-Pass"));
  my $salt = $r->header_in("Auth-Salt");

  our $sth=$dbh->prepare("select clear from users where email=? limit 1");
  $sth->execute($username);
  my $hash=$sth->fetchrow_hashref();
  my $real_password = $hash->{'clear'};

  # Authorize user
  if (($auth_method eq "plain" && $password eq $real_password) or
    ($auth_method eq "cram-md5" && $password eq hmac_md5_hex($salt, $real_password))) {
    # Auth OK, find mail server
    our $sth=$dbh->prepare("select destination_mailstore from transport where domain=? limit 1");
    my $domain = $r->header_in("Auth-User");
    $domain =~ s/^.*@//; # remove @ and everything before
    $sth->execute($domain);
    my $hash=$sth->fetchrow_hashref();
    my $mailserver = $hash->{'destination_mailstore'};
    $mailserver =~ s/smtp://;

    $r->header_out("Auth-User", $username);
    $r->header_out("Auth-Pass", $real_password);
    $r->header_out("Auth-Status", "OK");
    $r->header_out("Auth-Server", $mailserver);
    $r->header_out("Auth-Port", $protocol_ports->{$r->header_in("Auth-Protocol")});

    # Shared secret to ensure that the request comes from this script
    $r->header_out("X-NGX-Auth-Key", "some secret");
  } else {
    $r->header_out("Auth-Status", "Invalid login or password");
  }

  $r->send_http_header("text/html");

  return OK;
}

1;
__END__
