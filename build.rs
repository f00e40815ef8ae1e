//! Build script: generates the LR parser from `grammar/model.lalrpop`.

fn main() {
    lalrpop::Configuration::new()
        .set_in_dir("grammar")
        .process()
        .expect("the grammar in grammar/model.lalrpop must generate a parser");
}
