//! Generation tasks from labelled datasets: each example becomes a prompt and the answer a model
//! should generate (the built-ins' labels as words; a file's `response` column as it is).

use crate::data::{DataOptions, DataSpec, Dataset};

/// One prompt and the response to learn (or to match exactly in evaluation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptResponse {
    /// The example's id in its dataset.
    pub id: u64,
    /// The user's turn.
    pub prompt: String,
    /// The answer.
    pub response: String,
    /// The index of the response among the task's answers (for macro-F1).
    pub answer: usize,
}

/// How a dataset's examples are asked and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmTask {
    /// VADER: "…is the sentiment positive or negative?" → `positive` / `negative`.
    Sentiment,
    /// TREC: "which type of answer…?" → `abbreviation`, `description`, `entity`, `human`,
    /// `location`, `number`.
    QuestionType,
    /// SMS: "spam or ham?" → `spam` / `ham`.
    Spam,
    /// A data file with `prompt` and `response` columns: both as they are.
    Columns,
}

impl LmTask {
    /// The task of a data spec: the built-ins' own, a file's prompt/response columns; `None` for
    /// `trec-fine` (50 fine labels have no one-word answers).
    pub fn for_spec(spec: &DataSpec) -> Option<Self> {
        match spec {
            DataSpec::Vader(_) => Some(Self::Sentiment),
            DataSpec::Trec => Some(Self::QuestionType),
            DataSpec::Sms => Some(Self::Spam),
            DataSpec::File(_) => Some(Self::Columns),
            DataSpec::TrecFine => None,
        }
    }

    /// The options that read a file of this task (`prompt` → text, `response` → label).
    pub fn file_options() -> DataOptions {
        DataOptions { text_column: "prompt".into(), label_column: "response".into(), ..DataOptions::default() }
    }

    /// The answer word of each of `data`'s labels.
    pub fn answers(self, data: &Dataset) -> Vec<String> {
        data.label_names
            .iter()
            .map(|label| match self {
                Self::QuestionType => match label.as_str() {
                    "ABBR" => "abbreviation".into(),
                    "DESC" => "description".into(),
                    "ENTY" => "entity".into(),
                    "HUM" => "human".into(),
                    "LOC" => "location".into(),
                    "NUM" => "number".into(),
                    other => other.to_lowercase(),
                },
                _ => label.clone(),
            })
            .collect()
    }

    /// The user's turn for one text.
    pub fn prompt(self, text: &str) -> String {
        match self {
            Self::Sentiment => {
                format!("Review: {text}\nIs the sentiment of this review positive or negative? Answer with one word.")
            }
            Self::QuestionType => format!(
                "Question: {text}\nWhat kind of answer does this question ask for: abbreviation, description, \
                 entity, human, location or number? Answer with one word."
            ),
            Self::Spam => format!("Message: {text}\nIs this text message spam or ham? Answer with one word."),
            Self::Columns => text.to_string(),
        }
    }

    /// Every example of `data` as a prompt and its answer.
    pub fn pairs(self, data: &Dataset) -> Vec<PromptResponse> {
        let answers = self.answers(data);
        data.examples
            .iter()
            .map(|e| PromptResponse {
                id: e.id,
                prompt: self.prompt(&e.text),
                response: answers[e.label].clone(),
                answer: e.label,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Example;

    #[test]
    fn trec_labels_become_words_and_prompts_carry_the_text() {
        let data = Dataset {
            examples: vec![Example { id: 4, text: "Where is Rome?".into(), label: 1, group: None }],
            label_names: vec!["HUM".into(), "LOC".into()],
            group_names: vec![],
            source: "t".into(),
        };
        let pairs = LmTask::QuestionType.pairs(&data);
        assert_eq!(pairs[0].response, "location");
        assert_eq!(pairs[0].answer, 1);
        assert!(pairs[0].prompt.starts_with("Question: Where is Rome?\n"));
        assert_eq!(LmTask::Columns.pairs(&data)[0].prompt, "Where is Rome?");
        assert!(LmTask::for_spec(&DataSpec::TrecFine).is_none());
    }
}
